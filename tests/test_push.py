"""mmkd.hub and the recipe's --push_to_hub: what a student repository holds, the real huggingface_hub client
against a local stand-in of the Hub (tests/hub_standin.py), loading the pushed repository back by its id, and
one-line failures that leave the local folder as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmkd import hub as P
from mmkd.args import command_line
from tests.conftest import REPO, load_recipe
from tests.hub_standin import HubStandIn

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
TINY_RUN = ["--config", str(SMOKE), "--num_generated_examples", "32", "--per_device_train_batch_size", "8",
            "--max_steps", "2", "--use_cpu", "true", "--dataloader_num_workers", "0"]
LABELS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("clip_student")


@pytest.fixture(scope="module")
def trained(recipe, tmp_path_factory) -> Path:
    """A real 2-step student folder, with what a run leaves besides the model: a checkpoint (optimizer state,
    training_args.bin), TensorBoard logs, results JSONs, a plot, the offline job's stage record, hidden files."""
    out = tmp_path_factory.mktemp("trained") / "tiny-half"
    recipe.main([*TINY_RUN, "--output_dir", str(out), "--save_steps", "2", "--logging_steps", "1",
                 "--report_to", "tensorboard"])
    (out / "eval_results.json").write_text(json.dumps({"results": [{"dataset": "shapes", "acc1": 0.5}]}))
    (out / "results.json").write_text(json.dumps({"models": []}))
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out / "zeroshot_accuracy.png")
    (out / "mmkd_job_stage.json").write_text(json.dumps({"complete": True}))
    (out / ".DS_Store").write_bytes(b"\0")
    (out / "_partial.json").write_text("{}")
    return out


@pytest.fixture
def student(trained, tmp_path) -> Path:
    """A private copy of the trained folder (same bytes and mtimes) for a test to push or break."""
    return Path(shutil.copytree(trained, tmp_path / "tiny-half"))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: relative path -> (sha256, mtime in ns)."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def closed_port_endpoint() -> str:
    """An endpoint nothing listens on: a port the OS just handed out, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def point_hub_at(monkeypatch, endpoint: str, tmp_path: Path, xet: bool = True) -> None:
    """Let huggingface_hub (and transformers through it) talk to ``endpoint``: the suite runs with
    HF_HUB_OFFLINE=1 (conftest) and huggingface_hub reads its environment once, at import, into constants."""
    from huggingface_hub import constants, hf_api

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # the module-level client behind hf_api's functions


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, Hub-like (weights and pictures are LFS files), with the client on the classic LFS path."""
    with HubStandIn(tokens={"hf_standin"}) as standin:
        point_hub_at(monkeypatch, standin.endpoint, tmp_path, xet=False)
        yield standin


# 1. What a student repository holds ------------------------------------------------------------------------------
def test_files_to_push_is_the_model_its_card_and_records_never_checkpoints_or_logs(student):
    assert (student / "checkpoint-2" / "optimizer.pt").is_file() and list((student / "runs").rglob("events.*"))
    P.ensure_model_card(student, "me/tiny-half")
    names = [p.as_posix() for p in P.files_to_push(student)]
    assert names == sorted(names)
    assert set(names) == {
        "README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json", "training_config.json", "training_summary.json", "trainer_state.json",
        "eval_results.json", "results.json", "zeroshot_accuracy.png",
    }
    with_runs = [p.as_posix() for p in P.files_to_push(student, include_runs=True)]
    assert set(with_runs) - set(names) and all(n.startswith("runs/") for n in set(with_runs) - set(names))
    assert not any(n.startswith("checkpoint-") or n.endswith((".bin", ".pt", ".pth")) for n in with_runs)


def test_dry_run_lists_the_files_and_sends_nothing(student, capsys):
    from mmkd import cli

    assert cli.main(["push", str(student), "--repo-id", "me/tiny-half", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [p.as_posix() for p in P.files_to_push(student)]
    assert lines[-1].startswith("README.md") and not (student / "README.md").exists()  # no card yet: announced


@pytest.mark.parametrize("include_runs", [False, True])
def test_the_listing_is_what_upload_folder_sends(student, hub, monkeypatch, capsys, include_runs):
    """The dry run, huggingface_hub's filter_repo_objects over the folder with the patterns push_folder gives
    upload_folder, and the files that reached the Hub are one set, also in sub-folders that trip a ``*``."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    from mmkd import cli

    for trap in ("sweep/run-1/config.json", "sweep/run-1/model.safetensors", "weird[1]/results.json",
                 "runs/optimizer.bin", "runs/.hidden.json", "runs/_partial/a.json", "notes/extra.md"):
        (student / trap).parent.mkdir(parents=True, exist_ok=True)
        (student / trap).write_text("{}")
    P.ensure_model_card(student, "me/tiny-half")  # so the dry run lists the card like any other file
    sent_patterns = {}
    upload_folder = HfApi.upload_folder

    def spy(self, **kwargs):
        sent_patterns.update({k: list(kwargs[k]) for k in ("allow_patterns", "ignore_patterns")})
        return upload_folder(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", spy)
    P.push_folder(student, "me/tiny-half", token="hf_standin", include_runs=include_runs)
    assert cli.main(["push", str(student), "--repo-id", "me/tiny-half", "--dry-run"]
                    + (["--include-runs"] if include_runs else [])) == 0
    listed = capsys.readouterr().out.splitlines()

    on_disk = [p.relative_to(student).as_posix() for p in sorted(student.rglob("*")) if p.is_file()]
    selected = filter_repo_objects(on_disk, allow_patterns=sent_patterns["allow_patterns"],
                                   ignore_patterns=sent_patterns["ignore_patterns"] + DEFAULT_IGNORE_PATTERNS)
    assert listed == sorted(selected) == sorted(hub.repos["me/tiny-half"].files)
    assert not any(n.startswith(("sweep/", "weird", "notes/", "checkpoint-")) for n in listed)
    runs = [n for n in listed if n.startswith("runs/")]
    assert bool(runs) == include_runs and all(n.startswith("runs/") and "events" in n for n in runs)


# 2. Pushing through the real client --------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["lfs", "xet-pipeline"])
def test_push_uploads_exactly_those_files_byte_for_byte(student, monkeypatch, tmp_path, transport):
    """``lfs``: the Hub-like split (safetensors via the LFS batch API). ``xet-pipeline``: the client as installed
    (hf_xet present: upload_folder's streamed pipeline), every file regular since the stand-in has no Xet storage."""
    before = snapshot(student)
    with HubStandIn(tokens={"hf_standin"}, lfs=transport == "lfs") as standin:
        point_hub_at(monkeypatch, standin.endpoint, tmp_path, xet=transport != "lfs")
        url = P.push_folder(student, "me/tiny-half", token="hf_standin", private=True, endpoint=standin.endpoint)

    repo = standin.repos["me/tiny-half"]
    assert repo.private and len(repo.commits) == 1 and repo.commits[0]["summary"] == P.DEFAULT_COMMIT_MESSAGE
    assert url == f"{standin.endpoint}/me/tiny-half/commit/{repo.heads['main']}"
    pushed = P.files_to_push(student)
    assert repo.files == {p.as_posix(): (student / p).read_bytes() for p in pushed}
    assert 'model="me/tiny-half"' in repo.files["README.md"].decode()  # the card was written, naming the repo
    lfs_requests = [r for r in standin.requests if "/lfs/" in r.path or r.path.startswith("/_lfs/")]
    if transport == "lfs":
        assert "model.safetensors" in repo.snapshots[repo.heads["main"]].lfs and lfs_requests
    else:
        assert not lfs_requests
    create = next(r for r in standin.requests if r.path == "/api/repos/create")
    assert create.headers["authorization"] == "Bearer hf_standin"
    assert not standin.unhandled
    after = snapshot(student)
    assert set(after) - set(before) == {"README.md"}  # the one file the push adds; nothing else changed
    assert {k: after[k] for k in before} == before


def test_the_pushed_repository_loads_by_its_id_like_the_local_folder(student, hub):
    from transformers import CLIPModel, pipeline

    P.push_folder(student, "me/tiny-half", token="hf_standin")
    remote = CLIPModel.from_pretrained("me/tiny-half", token="hf_standin")  # downloaded from the stand-in
    local = CLIPModel.from_pretrained(student)
    remote_sd, local_sd = remote.state_dict(), local.state_dict()
    assert remote_sd.keys() == local_sd.keys()
    assert all(torch.equal(remote_sd[k], local_sd[k]) for k in local_sd)
    assert any(r.path.startswith("/me/tiny-half/resolve/") for r in hub.requests)

    image = Image.new("RGB", (40, 36), (220, 40, 40))
    from_hub = pipeline("zero-shot-image-classification", model="me/tiny-half", device="cpu", token="hf_standin")
    from_disk = pipeline("zero-shot-image-classification", model=str(student), device="cpu")
    got, want = from_hub(image, candidate_labels=LABELS), from_disk(image, candidate_labels=LABELS)
    assert [s["label"] for s in got] == [s["label"] for s in want]
    assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-6)
    assert sum(s["score"] for s in got) == pytest.approx(1.0, abs=1e-4)


def test_a_second_push_of_the_same_folder_makes_no_commit_and_a_branch_gets_its_own(student, hub):
    first = P.push_folder(student, "me/tiny-half", token="hf_standin")
    assert P.push_folder(student, "me/tiny-half", token="hf_standin") == first  # unchanged: no empty commit
    repo = hub.repos["me/tiny-half"]
    assert len(repo.commits) == 1
    main_files = dict(repo.files)
    (student / "results.json").write_text(json.dumps({"models": ["v2"]}))
    P.push_folder(student, "me/tiny-half", token="hf_standin", revision="v2", commit_message="v2 of the student")
    assert repo.files == main_files  # main as it was; the branch (made from main) got the change
    assert repo.at("v2")[1].files == {**main_files, "results.json": (student / "results.json").read_bytes()}
    assert [(c["branch"], c["summary"], c["files"]) for c in repo.commits[1:]] == [
        ("v2", "v2 of the student", ["results.json"])
    ]


def test_a_name_without_namespace_goes_to_the_token_user_and_the_card_names_the_full_id(student, hub):
    P.push_folder(student, "tiny-half", token="hf_standin")
    repo = hub.repos["standin-user/tiny-half"]
    assert 'model="standin-user/tiny-half"' in repo.files["README.md"].decode()


# 3. Failures: one line, the local folder as it was -----------------------------------------------------------
def test_unreachable_hub_raises_one_line_and_leaves_the_folder_untouched(student, monkeypatch, tmp_path):
    endpoint = closed_port_endpoint()
    point_hub_at(monkeypatch, endpoint, tmp_path)
    before = snapshot(student)
    with pytest.raises(P.PushError) as info:
        P.push_folder(student, "me/tiny-half", token="hf_standin")
    message = str(info.value)
    assert "\n" not in message
    assert "me/tiny-half" in message and endpoint in message and "creating the repository" in message
    assert f"the local folder {student} is intact" in message
    assert snapshot(student) == before  # not even the card: the repository never existed


def test_cli_without_network_exits_1_with_one_stderr_line(student, tmp_path):
    before = snapshot(student)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env["HF_ENDPOINT"] = closed_port_endpoint()
    proc = subprocess.run([sys.executable, "-m", "mmkd", "push", str(student), "--repo-id", "me/tiny-half"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmkd push: error: push to me/tiny-half at ")
    assert env["HF_ENDPOINT"] in lines[0] and lines[0].endswith("is intact")
    assert proc.stdout == ""
    assert snapshot(student) == before

    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mmkd.push", str(student), "--repo-id", "me/tiny-half"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in proc.stderr and "not attempted" in proc.stderr
    assert snapshot(student) == before


def test_a_refused_token_is_one_line_naming_the_status(student, hub):
    before = snapshot(student)
    with pytest.raises(P.PushError, match=r"HTTP 401 .*check the token.*is intact$"):
        P.push_folder(student, "me/tiny-half", token="hf_wrong")
    assert "me/tiny-half" not in hub.repos and snapshot(student) == before


@pytest.mark.parametrize(
    ("remove", "named"),
    [("config.json", "config.json"), ("model.safetensors", "safetensors"),
     ("processor_config.json", "image processor"), ("training_summary.json", "training_summary.json")],
)
def test_an_incomplete_folder_fails_before_any_network_call(student, hub, remove, named):
    (student / remove).unlink()
    with pytest.raises(FileNotFoundError, match=named):
        P.push_folder(student, "me/tiny-half", token="hf_standin")
    assert hub.requests == []


def test_an_invalid_repo_id_fails_before_any_network_call(student, hub):
    with pytest.raises(ValueError, match="invalid repository id 'me/not a name'"):
        P.push_folder(student, "me/not a name", token="hf_standin")
    assert hub.requests == []


# 4. The model card ---------------------------------------------------------------------------------------------
def test_an_mmkd_card_gets_the_repo_in_its_snippet_and_a_foreign_card_stays_as_it_is(student, tmp_path):
    card = P.ensure_model_card(student, str(student))  # as recipes/offline_job.py writes it: the local path
    text = card.read_text()
    assert f'model="{student}"' in text
    P.ensure_model_card(student, "me/tiny-half")
    # the pipeline snippet and the Formats section's loading calls name the repository; nothing else changes
    assert card.read_text() == text.replace(f'"{student}"', '"me/tiny-half"')
    mtime = card.stat().st_mtime_ns
    P.ensure_model_card(student, "me/tiny-half")  # already right: not rewritten
    assert card.stat().st_mtime_ns == mtime

    foreign = "---\nlicense: mit\n---\n# My model\npipeline(\"zero-shot-image-classification\", model=\"x/y\")\n"
    card.write_text(foreign)
    P.ensure_model_card(student, "me/tiny-half")
    assert card.read_text() == foreign


def test_the_card_command_never_carries_a_token():
    argv = ["--config", "c.yaml", "--hub_token", "hf_secret", "--hub_model_id", "me/x", "--hub_token=hf_other"]
    command = command_line("recipes/clip_student.py", argv)
    assert command == "accelerate launch recipes/clip_student.py --config c.yaml --hub_model_id me/x"


# 5. The recipe -------------------------------------------------------------------------------------------------
def test_recipe_pushes_the_saved_student_once_at_the_end(recipe, hub, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("HF_TOKEN", "hf_standin")  # the token reaches the push through the environment only
    summary = recipe.main([*TINY_RUN, "--output_dir", str(out), "--save_steps", "1", "--report_to", "none",
                           "--push_to_hub", "true", "--hub_model_id", "me/tiny-half", "--hub_private_repo", "true"])
    repo = hub.repos["me/tiny-half"]
    assert repo.private and [c["summary"] for c in repo.commits] == ["End of training"]  # no checkpoint pushes
    assert summary["hub_commit_url"].endswith(repo.heads["main"])
    assert sum(r.path == "/api/repos/create" for r in hub.requests) == 1
    assert repo.files == {p.as_posix(): (out / p).read_bytes() for p in P.files_to_push(out)}
    assert (out / "checkpoint-2").is_dir() and not any(f.startswith("checkpoint-") for f in repo.files)
    card = repo.files["README.md"].decode()
    assert 'model="me/tiny-half"' in card and "--hub_model_id me/tiny-half" in card
    assert "hf_standin" not in card and b"hf_standin" not in repo.files["training_config.json"]


def test_recipe_without_network_saves_the_student_then_exits_with_one_line(recipe, monkeypatch, tmp_path):
    endpoint = closed_port_endpoint()
    point_hub_at(monkeypatch, endpoint, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        recipe.main([*TINY_RUN, "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none",
                     "--push_to_hub", "true", "--hub_model_id", "me/tiny-half"])
    message = str(info.value.code)
    assert "\n" not in message and "me/tiny-half" in message and endpoint in message and "intact" in message
    # Trainer did not try the network before training: the run finished and the student is complete on disk
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 2
    assert P.files_to_push(out)
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(out).config.vision_config.num_hidden_layers == 2


# 5. Every format in one repository -------------------------------------------------------------------------------
def _hub_env(hub, tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh interpreter that downloads from the stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_standin", HF_HUB_CACHE=str(tmp_path / "fresh-cache"),
               HF_HUB_DISABLE_XET="1")
    return env


def test_every_export_is_pushed_listed_on_the_card_and_loads_from_the_hub_without_mmkd(student, hub, tmp_path,
                                                                                          monkeypatch):
    """open_clip and ONNX (fp32 + int8, measured) exports written into the student folder go up with it; the card
    lists each format and shows the int8 export's measured size, speed and accuracy; the card's onnxruntime snippet,
    run as written in an interpreter that cannot import mmkd, gives the int8 encoders' embeddings; open_clip loads
    the repository by its hf-hub: id."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import open_clip
    from transformers import CLIPModel, CLIPProcessor

    from mmkd.interop.formats import available_formats
    from mmkd.interop.to_onnx import METADATA_FILE, ONNXCLIP, export_onnx
    from mmkd.interop.to_open_clip import export_open_clip
    from tests.test_zeroshot import COLOR_NAMES, write_folder

    card_before = P.ensure_model_card(student, str(student)).read_text()  # rendered before any export
    assert "| transformers (PyTorch) |" in card_before and "ONNX" not in card_before
    export_open_clip(student, student)
    export_onnx(student, student / "onnx", int8=True,
                eval_dataset=str(write_folder(tmp_path / "colors", 12, COLOR_NAMES)))
    assert available_formats(student) == ["transformers", "open_clip", "onnx", "onnx-int8"]
    listed = {p.as_posix() for p in P.files_to_push(student)}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "onnx/image_encoder.onnx", "onnx/text_encoder.onnx",
            "onnx/image_encoder.int8.onnx", "onnx/text_encoder.int8.onnx", "onnx/mmkd_onnx.json",
            "onnx/tokenizer.json"} <= listed
    assert listed & {"onnx/preprocessor_config.json", "onnx/processor_config.json"}  # the image processor too
    assert not any(p.startswith("checkpoint-") for p in listed)

    P.push_folder(student, "me/tiny-half", token="hf_standin")
    repo = hub.repos["me/tiny-half"]
    assert listed == set(repo.files)
    card = repo.files["README.md"].decode()
    assert card.count("## Formats") == 1 and "sentence-transformers" not in card.split("## Formats")[1].split("##")[0]
    for row in ("| transformers (PyTorch) |", "| open_clip |", "| ONNX fp32 (onnxruntime) |", "| ONNX int8 (onnxruntime) |"):
        assert row in card
    assert 'open_clip.create_model_and_transforms("hf-hub:me/tiny-half")' in card
    report = json.loads((student / "onnx" / METADATA_FILE).read_text())["int8_report"]
    size, acc = report["size_mb"], report["accuracy"]
    assert f"| size of the two encoders (MB) | {size['fp32']:.1f} | {size['int8']:.1f} |" in card
    assert (f"| images/s (batch 32) | {report['image_per_s']['fp32']:.1f} | {report['image_per_s']['int8']:.1f} |"
            in card)
    assert (f"| {100 * acc['fp32_acc1']:.2f} | {100 * acc['int8_acc1']:.2f} | "
            f"{100 * (acc['int8_acc1'] - acc['fp32_acc1']):+.2f} points |") in card

    snippet = card.split("```python\n# needs onnxruntime")[1].split("```")[0]
    Image.new("RGB", (50, 40), (30, 160, 220)).save(tmp_path / "photo.png")
    script = ("import sys\nsys.modules['mmkd'] = None  # importing mmkd fails from here on\nimport numpy as np\n"
              "from PIL import Image\nimage = Image.open(sys.argv[1])\n# needs onnxruntime" + snippet
              + "np.save(sys.argv[2], image_embeds)\nnp.save(sys.argv[3], text_embeds)\n")
    (tmp_path / "snippet.py").write_text(script)
    subprocess.run([sys.executable, "snippet.py", "photo.png", "image.npy", "text.npy"], cwd=tmp_path,
                   env=_hub_env(hub, tmp_path), check=True, timeout=300)
    local = ONNXCLIP(student / "onnx", int8=True)
    processor = CLIPProcessor.from_pretrained(student / "onnx")
    pixels = processor(images=[Image.open(tmp_path / "photo.png")], return_tensors="pt")["pixel_values"]
    tokens = processor(text=["a photo of a sneaker"], padding=True, return_tensors="pt")
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), local.get_image_features(pixels).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "text.npy"),
                               local.get_text_features(tokens["input_ids"], tokens["attention_mask"]).numpy(), atol=1e-6)

    monkeypatch.setenv("HF_TOKEN", "hf_standin")  # open_clip's download takes no token argument
    model, _, _ = open_clip.create_model_and_transforms("hf-hub:me/tiny-half")
    with torch.no_grad():
        want = CLIPModel.from_pretrained(student).eval().get_image_features(pixel_values=pixels).pooler_output
        got = model.eval().encode_image(pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_sentence_transformers_folder_pushes_with_a_card_listing_it(student, hub, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mmkd.interop.to_sentence_transformers import export_sentence_transformers

    folder = tmp_path / "tiny-half-st"
    export_sentence_transformers(student, folder)
    P.push_folder(folder, "me/tiny-half-st", token="hf_standin")
    repo = hub.repos["me/tiny-half-st"]
    assert {"modules.json", "config_sentence_transformers.json", "model.safetensors", "config.json",
            "training_summary.json", "README.md"} <= set(repo.files)
    card = repo.files["README.md"].decode()  # rendered from the records the export copied
    assert '`SentenceTransformer("me/tiny-half-st")`, then `.encode([image])`' in card
    assert "| transformers (PyTorch) |" in card and "distilled" in card
    remote = SentenceTransformer("me/tiny-half-st", device="cpu", token="hf_standin")
    image = Image.new("RGB", (40, 36), (220, 40, 40))
    local = SentenceTransformer(str(folder), device="cpu")
    for batch in ([image], ["a red circle"]):  # one modality per call, as sentence-transformers requires
        want = local.encode(batch, convert_to_tensor=True)
        torch.testing.assert_close(remote.encode(batch, convert_to_tensor=True), want, atol=1e-6, rtol=0)


def test_an_incomplete_onnx_export_is_refused_before_any_network_call(student, hub):
    pytest.importorskip("onnxruntime")
    from mmkd.interop.to_onnx import export_onnx

    export_onnx(student, student / "onnx")
    (student / "onnx" / "text_encoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="missing onnx/text_encoder.onnx"):
        P.push_folder(student, "me/tiny-half", token="hf_standin")
    assert hub.requests == []
