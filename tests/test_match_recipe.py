"""recipes/match_student.py: the three experiments, the table, the cache path, the sweep and a 2-process launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPProcessor

from mmkd.data.collators import MatchCollator
from mmkd.eval.match_metrics import match_metrics
from mmkd.students import ResNetMiniLMMatcher, load_text_tokenizer
from mmkd.teachers.matcher import CLIPMatcher
from tests.conftest import REPO, load_recipe
from tests.test_offline_job import fmnist_dir  # noqa: F401  (fixture: tiny Fashion-MNIST IDX files)
from tests.test_push import hub  # noqa: F401  (fixture: the local stand-in of the Hub)

match_student = load_recipe("match_student")


def recipe_argv(out, data_dir, clip_dir, stage="all", steps=3, *extra):
    return ["--config", str(REPO / "recipes/configs/match_fashion_mnist.yaml"), "--stage", stage,
            "--output_dir", str(out), "--data_dir", str(data_dir), "--teacher_name_or_path", str(clip_dir),
            "--max_train_samples", "48", "--max_eval_samples", "20", "--stage_max_steps", str(steps),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("match")
    rows = match_student.main(recipe_argv(out, fmnist_dir, tiny_hf_clip_dir))
    return out, rows


def predict(model, collator, dataset):
    logits, labels = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(dataset), 8):
            batch = collator([dataset[j] for j in range(i, min(i + 8, len(dataset)))])
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            logits.append(out.logits)
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def test_three_experiments_and_the_table(trained, fmnist_dir):  # noqa: F811
    out, rows = trained
    assert [r["model"].split()[0] for r in rows] == ["teacher", "baseline", "distilled"]
    assert all(r["global_step"] == 3 for r in rows)
    assert rows[0]["alpha"] == rows[1]["alpha"] == 0.0 and rows[2]["alpha"] == 0.5 and rows[2]["temperature"] == 3.0
    # The table's numbers are the models' own: recompute the baseline's metrics from its saved weights.
    from mmkd.data.pairs import fashion_mnist_matching

    pairs = fashion_mnist_matching(fmnist_dir, seed=0, max_train_samples=48, max_eval_samples=20)
    student = ResNetMiniLMMatcher.from_pretrained(out / "baseline")
    collator = MatchCollator(student.preprocessing(load_text_tokenizer(str(out / "baseline"))))
    logits, labels = predict(student, collator, pairs["validation"])
    direct = match_metrics(logits, labels)
    for metric in ("accuracy", "precision", "recall", "f1"):
        assert rows[1][metric] == pytest.approx(direct[metric], abs=1e-6)
    table = (out / "results.md").read_text()
    assert f"| {100 * rows[1]['accuracy']:.2f} | {100 * rows[1]['precision']:.2f} |" in table
    assert json.loads((out / "results.json").read_text())["models"] == rows
    # The teacher folder is a complete matcher with its processor.
    teacher = CLIPMatcher.from_pretrained(out / "teacher")
    assert teacher.config.head == "cosine"
    CLIPProcessor.from_pretrained(out / "teacher")


def test_baseline_and_distilled_start_from_the_same_weights(fmnist_dir):  # noqa: F811
    margs = match_student.MatchArguments(image_size=32)
    a, b = match_student.build_student(margs, seed=0), match_student.build_student(margs, seed=0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_cached_teacher_embeddings_train_the_same_student(trained, fmnist_dir, tiny_hf_clip_dir, tmp_path):  # noqa: F811
    out, rows = trained
    (tmp_path / "teacher").symlink_to(out / "teacher")  # a separate folder: the fixture's students stay as they are

    def distill(*extra):
        return match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "distill", 3, *extra))[-1]

    # logit term only: the cached embeddings, put through the teacher's head, replace the teacher
    cache = ["--teacher_cache_dir", str(tmp_path / "cache")]
    live, cached = distill("--feature_weight", "0"), distill("--feature_weight", "0", *cache)
    assert live["feature_weight"] == 0.0
    for metric in ("accuracy", "f1", "roc_auc"):
        assert cached[metric] == pytest.approx(live[metric], abs=1e-6)
    assert cached["eval_loss"] == pytest.approx(live["eval_loss"], rel=1e-4)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one keyed cache, written once
    # with the feature term (the config's default) the same cache serves both terms: the same student as live
    featured = distill(*cache)
    assert featured["feature_weight"] == 1.0 and featured["eval_loss"] == pytest.approx(rows[2]["eval_loss"], rel=1e-4)


def test_sweep_writes_the_grid(trained, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    out, _ = trained
    runs = match_student.main(recipe_argv(out, fmnist_dir, tiny_hf_clip_dir, "sweep", 2, "--feature_weight", "0",
                                          "--sweep_alphas", "0.25,0.75", "--sweep_temperatures", "3"))
    assert [(r["alpha"], r["temperature"]) for r in runs] == [(0.25, 3.0), (0.75, 3.0)]
    assert all(r["feature_weight"] == 0.0 for r in runs)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["runs"] == runs
    assert all("--stage sweep" in r["command"] for r in runs)  # each cell says how to reproduce it
    md = (out / "sweep.md").read_text()
    assert f"| 0.75 | {100 * runs[1]['f1']:.2f} |" in md
    assert (out / "sweep.png").stat().st_size > 1000


def test_bad_stage_and_missing_teacher(tmp_path, fmnist_dir, tiny_hf_clip_dir, capsys):  # noqa: F811
    for stage, expected in (("teach", "stage='teach'"), ("distill", "run --stage teacher first")):
        with pytest.raises(SystemExit) as info:
            match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, stage))
        assert info.value.code == 2 and expected in capsys.readouterr().err


def test_two_process_launch(tmp_path, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "recipes/match_student.py"),
           *recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "all", 2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["models"]
    assert [r["world_size"] for r in rows] == [2, 2, 2]
    assert all(r["global_step"] == 2 for r in rows)


# Model cards and --push_to_hub ---------------------------------------------------------------------------------------
def read_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_every_student_folder_gets_a_card_with_its_results_as_model_index(trained):
    out, _ = trained
    rows = json.loads((out / "results.json").read_text())["models"]
    for folder, kind in (("baseline", "baseline"), ("distilled", "distilled")):
        own = json.loads((out / folder / "eval_results.json").read_text())
        card = read_card(out / folder / "README.md")
        assert "mmkd" in card.data.tags and kind in card.data.tags
        got = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert got == {m: round(100 * own[m], 2) for m in ("accuracy", "precision", "recall", "f1", "roc_auc")}
        assert {r.task_type for r in card.data.eval_results} == {"image-text-matching"}
        # the table compares with every model of the run; this model's row is marked
        for r in rows:
            assert f"{100 * r['accuracy']:.2f} | {100 * r['precision']:.2f} |" in card.text
        assert f"**{own['model']} (this model)**" in card.text
        assert f'ResNetMiniLMMatcher.from_pretrained("{out / folder}")' in card.text
        assert own["command"].startswith("accelerate launch recipes/match_student.py --config")
        assert own["command"] in card.text  # the reproduce line: the launch that trained this student
    distilled = read_card(out / "distilled" / "README.md").text
    assert "T = 3" in distilled and "hinton2015distilling" in distilled and "| `soft` | 0.5 |" in distilled
    assert "trained alone" not in distilled
    assert "| `image_feature`, `text_feature` | 1.0 |" in distilled  # the config's feature term, with its weight
    assert "(+ feature projections " in distilled
    baseline = read_card(out / "baseline" / "README.md").text
    assert "--stage all" in baseline  # trained by the fixture's launch, whatever later launches retrained
    assert "trained alone" in baseline and "`soft`" not in baseline and "| `hard` | 1.0 |" in baseline


def test_card_parameter_counts_come_from_the_weights(trained):
    from mmkd.reporting.cards import match_parameter_counts

    out, _ = trained
    model = ResNetMiniLMMatcher.from_pretrained(out / "distilled")
    counts = match_parameter_counts(out / "distilled")
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["image"] == sum(p.numel() for p in model.image_encoder.parameters())
    assert counts["text"] == sum(p.numel() for p in model.text_encoder.parameters())
    assert counts["head"] == sum(p.numel() for p in model.head.parameters())
    # the config's feature term gives the distilled student its projections; they are counted apart
    projections = sum(p.numel() for m in (model.image_projection, model.text_projection) for p in m.parameters())
    assert counts["projection"] == projections > 0


def test_gap_closed_is_worked_out_from_the_three_accuracies(trained):
    from mmkd.reporting.cards import match_student_card_data, render_match_student_card

    out, _ = trained
    own = json.loads((out / "distilled" / "eval_results.json").read_text())
    others = [{"model": "teacher (CLIP matcher)", "parameters": 10, "accuracy": own["accuracy"] + 0.2,
               "precision": None, "recall": None, "f1": None, "roc_auc": None},
              {"model": "baseline (ResNet+MiniLM alone)", "parameters": 9, "accuracy": own["accuracy"] - 0.05,
               "precision": None, "recall": None, "f1": None, "roc_auc": None}]
    data = match_student_card_data(out / "distilled", results=others, repo_id="me/m")
    assert data.gap_closed == pytest.approx(0.05 / 0.25)
    assert data.teacher_parameters == 10
    assert [r["model"].split()[0] for r in data.results] == ["teacher", "baseline", "distilled"]
    text = str(render_match_student_card(data))
    assert "closes 20 % of the accuracy gap" in text and "| n/a |" in text


def test_a_card_needs_a_match_student_folder(trained):
    from mmkd.reporting.cards import match_student_card_data

    out, _ = trained
    with pytest.raises(ValueError, match="mmkd_clip_matcher"):
        match_student_card_data(out / "teacher")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        match_student_card_data(out)


def test_push_to_hub_sends_the_distilled_student_and_it_loads_by_id(trained, fmnist_dir, tiny_hf_clip_dir, hub,  # noqa: F811
                                                                      tmp_path, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    from mmkd import hub as P

    src, _ = trained
    out = tmp_path / "run"
    shutil.copytree(src / "teacher", out / "teacher")
    monkeypatch.setenv("HF_TOKEN", "hf_standin")  # the token reaches the push through the environment only
    match_student.main(recipe_argv(out, fmnist_dir, tiny_hf_clip_dir, "distill", 2, "--push_to_hub", "true",
                                   "--hub_model_id", "me/fmnist-matcher"))
    repo = hub.repos["me/fmnist-matcher"]
    assert [c["summary"] for c in repo.commits] == ["End of training"]
    assert repo.files == {p.as_posix(): (out / "distilled" / p).read_bytes()
                          for p in P.files_to_push(out / "distilled")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "eval_results.json",
            "training_config.json"} <= set(repo.files)
    card = repo.files["README.md"].decode()
    assert 'ResNetMiniLMMatcher.from_pretrained("me/fmnist-matcher")' in card
    assert 'AutoTokenizer.from_pretrained("me/fmnist-matcher")' in card and "hf_standin" not in card
    remote = ResNetMiniLMMatcher.from_pretrained("me/fmnist-matcher", token="hf_standin")
    local = ResNetMiniLMMatcher.from_pretrained(out / "distilled")
    assert all(torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values(),
                                                 strict=True))
    tok = AutoTokenizer.from_pretrained("me/fmnist-matcher", token="hf_standin")
    assert tok("a photo of a sneaker")["input_ids"] == load_text_tokenizer(str(out / "distilled"))(
        "a photo of a sneaker")["input_ids"]


def test_push_of_a_match_folder_without_card_writes_the_match_card(trained, hub, tmp_path):  # noqa: F811
    import shutil

    from mmkd import hub as P

    src, _ = trained
    folder = Path(shutil.copytree(src / "baseline", tmp_path / "baseline"))
    (folder / "README.md").unlink()
    P.push_folder(folder, "me/baseline", token="hf_standin")
    card = read_card(folder / "README.md")
    assert "baseline" in card.data.tags and card.data.eval_results
    assert hub.repos["me/baseline"].files["README.md"] == (folder / "README.md").read_bytes()
    assert 'from_pretrained("me/baseline")' in card.text


def test_push_to_hub_with_the_teacher_stage_fails_before_training(tmp_path, fmnist_dir, tiny_hf_clip_dir,  # noqa: F811
                                                                  capsys):
    with pytest.raises(SystemExit) as info:
        match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "teacher", 2, "--push_to_hub", "true"))
    assert info.value.code == 2 and "push_to_hub=true: pushes a student" in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()


def test_pairs_seed_fixes_the_pairs_while_seed_varies_the_student(tmp_path, fmnist_dir, tiny_hf_clip_dir,  # noqa: F811
                                                                  monkeypatch):
    seen = []
    real = match_student.load_pairs

    class Stop(Exception):
        pass

    def spy(data_args):
        seen.append(data_args.pairs_seed)
        return real(data_args)

    def stop(*args, **kwargs):
        raise Stop  # right after building the pairs

    monkeypatch.setattr(match_student, "load_pairs", spy)
    monkeypatch.setattr(match_student, "run_baseline", stop)
    with pytest.raises(Stop):
        match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "baseline", 2, "--seed", "3",
                                       "--pairs_seed", "0"))
    with pytest.raises(Stop):
        match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "baseline", 2, "--seed", "3"))
    assert seen == [0, 3]


def test_a_match_folder_without_its_tokenizer_is_refused_before_any_network_call(trained, tmp_path):
    import shutil

    from mmkd import hub as P

    src, _ = trained
    folder = Path(shutil.copytree(src / "distilled", tmp_path / "distilled"))
    assert "tokenizer.json" in {p.as_posix() for p in P.files_to_push(folder)}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match="missing the MiniLM tokenizer"):
        P.push_folder(folder, "me/x", endpoint="http://127.0.0.1:9")
