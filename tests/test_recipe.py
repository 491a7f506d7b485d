"""recipes/clip_student.py: argument parsing, the real-scale config's model building, and real launches."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from mmkd.checks import ConfigError
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
CC3M = REPO / "recipes" / "configs" / "vit_b32_cc3m.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("clip_student")


def test_yaml_config_and_command_line_overrides(recipe, tmp_path):
    data_args, args = recipe.parse_args(
        ["--config", str(SMOKE), "--output_dir", str(tmp_path), "--max_steps", "7", "--triplet_margin", "0.3"]
    )
    assert args.max_steps == 7 and args.triplet_margin == 0.3  # command line wins
    assert args.per_device_train_batch_size == 16 and args.contrastive_weight == 0.5  # from the YAML
    assert data_args.dataset_name == "shapes" and data_args.num_generated_examples == 512
    assert args.teacher_name_or_path.endswith("tiny_openclip_vit.json")
    assert args.remove_unused_columns is False


def test_bad_configs_fail_before_any_work(recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher_name_or_path: x\ntriplet_margn: 0.2\n")
    with pytest.raises(ConfigError, match="triplet_margn"):
        recipe.parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="missing.yaml"):
        recipe.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="'semi'"):
        recipe.parse_args(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--triplet_negatives", "semi"])


def _write_wds_shard(path, n=4):
    """A webdataset shard as img2dataset writes it: <key>.jpg, <key>.txt and <key>.json per sample."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (300, 260), (40 * i, 100, 200)).save(buf, format="JPEG")
            members = {
                "jpg": buf.getvalue(),
                "txt": f"caption number {i}".encode(),
                "json": json.dumps({"key": key}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_real_scale_config_builds_from_hub_ids_pointed_at_local_files(recipe, tmp_path, monkeypatch):
    """vit_b32_cc3m.yaml: the open_clip hub download and the hub dataset are redirected to local files."""
    import datasets
    import open_clip
    from safetensors.torch import save_file

    # A ViT-B-32 checkpoint with random weights, in the file layout of the laion hub repository.
    reference = open_clip.create_model("ViT-B-32", pretrained=None)
    ckpt = tmp_path / "open_clip_model.safetensors"
    save_file(reference.state_dict(), ckpt)
    requested = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        if not filename.endswith(".safetensors"):
            raise FileNotFoundError(filename)
        return str(ckpt)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", fake_hf_hub_download)
    shard = tmp_path / "cc3m-train-0000.tar"
    _write_wds_shard(shard)
    real_load_dataset = datasets.load_dataset
    seen = {}

    def fake_load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        seen.update(name=name, split=split, streaming=streaming)
        return real_load_dataset("webdataset", data_files={"train": str(shard)}, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    # TrainingArguments refuses bf16 on a machine without a bf16 GPU unless told to use the CPU.
    data_args, args = recipe.parse_args(
        ["--config", str(CC3M), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    )
    assert args.bf16 and args.max_steps == 20000 and args.per_device_train_batch_size == 256
    teacher, student, processor, init, counts = recipe.build_models(args)
    assert requested and requested[0][0].startswith("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert teacher.weights_hash() and torch.equal(
        teacher.model.visual.proj, reference.visual.proj
    )  # the redirected checkpoint really was loaded
    sc = student.config
    assert sc.vision_config.num_hidden_layers == 6 and sc.text_config.num_hidden_layers == 6
    assert sc.vision_config.hidden_size == 768 and sc.text_config.hidden_size == 512
    assert sc.vision_config.patch_size == 32 and sc.projection_dim == 512
    assert init.vision_layers == [0, 2, 4, 6, 8, 10]
    assert counts["student"]["total"] < 0.7 * counts["teacher"]["total"]

    train = recipe.load_train_dataset(data_args)
    assert seen == {"name": "pixparse/cc3m-wds", "split": "train", "streaming": True}
    collator = recipe.CLIPDistillationCollator(processor, teacher.inputs(), image_column="jpg", text_column="txt")
    batch = collator(list(train.take(2)))
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and "teacher_pixel_values" not in batch


def _launch(cmd, tmp_path, extra_env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_process_launch_writes_a_pipeline_ready_student(tmp_path):
    """A real 2-process CPU launch (torchrun under accelerate, gloo): two ranks, the batch gathered across them, the
    class-logit terms' prompts encoded outside the DDP forward on the same parameters."""
    out = tmp_path / "student"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    _launch(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "recipes/clip_student.py", "--config", str(SMOKE), "--output_dir", str(out),
         "--max_steps", "4", "--save_strategy", "no", "--report_to", "none", "--class_kd_weight", "0.5"],
        tmp_path,
        extra_env={"ACCELERATE_USE_CPU": "1"},
    )
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    assert {"class_ce", "class_kd"} <= {r["name"] for r in summary["losses"]}
    assert summary["gathered_batch_size"] == 2 * summary["per_device_train_batch_size"] == 32
    assert summary["global_step"] == 4

    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    labels = ["a red circle", "a blue square", "a green triangle", "a purple cross"]
    scores = classifier(Image.new("RGB", (48, 40), (220, 40, 40)), candidate_labels=labels)
    assert sorted(s["label"] for s in scores) == sorted(labels)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-4)


def test_recipe_in_process_writes_tensorboard_logs_and_resumes(recipe, tmp_path):
    """The `python recipes/clip_student.py` path: train, checkpoint, TensorBoard events, then resume to a later step."""
    out = tmp_path / "run"
    common = ["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "64",
              "--save_steps", "2", "--logging_steps", "1", "--use_cpu", "true"]
    first = recipe.main([*common, "--max_steps", "2"])
    assert first["global_step"] == 2 and first["world_size"] == 1
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    second = recipe.main([*common, "--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert second["global_step"] == 4
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 4


def test_recipe_trains_from_the_teacher_cache(recipe, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "48",
            "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--teacher_cache_dir", str(cache)]
    summary = recipe.main(argv)
    assert summary["teacher_embeddings"] == "cached" and summary["global_step"] == 2
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (entry / "mmkd_cache.json").is_file()
    again = recipe.main(argv)  # a second run finds the cache (same teacher seed, same generated data)
    assert again["teacher_embeddings"] == "cached" and len(list(cache.iterdir())) == 1


def test_recipe_reads_fashion_mnist_and_conceptual_captions(recipe, tmp_path):
    """The local builders behind --dataset_name, on files written in their real formats."""
    import numpy as np

    from tests.test_fashion_mnist import write_split

    fm = tmp_path / "fm"
    write_split(fm, "train", np.full((20, 28, 28), 7, dtype=np.uint8), np.arange(20, dtype=np.uint8) % 10)
    data_args, _ = recipe.parse_args(["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"),
                                      "--dataset_name", "fashion_mnist", "--data_dir", str(fm),
                                      "--max_train_samples", "10"])
    ds = recipe.load_train_dataset(data_args)
    assert len(ds) == 10 and sorted(ds["label"]) == list(range(10))

    shard = tmp_path / "cc" / "00000.tar"
    shard.parent.mkdir()
    _write_wds_shard(shard, n=3)
    data_args, _ = recipe.parse_args(["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"),
                                      "--dataset_name", "conceptual_captions", "--data_dir", str(shard.parent)])
    ds = recipe.load_train_dataset(data_args)
    assert sorted(ds["text"]) == [f"caption number {i}" for i in range(3)]
    data_args, _ = recipe.parse_args(["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"),
                                      "--dataset_name", "conceptual_captions"])
    with pytest.raises(ValueError, match="--data_dir"):
        recipe.load_train_dataset(data_args)


@pytest.mark.parametrize(
    "config, script",
    [
        ("smoke.yaml", "clip_student"),
        ("vit_b32_cc3m.yaml", "clip_student"),
        ("fashion_mnist_student.yaml", "clip_student"),
        ("fashion_mnist_teacher.yaml", "train_teacher"),
    ],
)
def test_every_shipped_config_parses_with_its_recipe(config, script, tmp_path):
    """A typo in a YAML file nobody runs here (an unknown key, a bad value) fails this test."""
    from mmkd.args import parse_args
    from mmkd.data.sources import DataArguments
    from mmkd.trainers import CLIPDistillationConfig

    argv = ["--config", str(REPO / "recipes" / "configs" / config), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    module = load_recipe(script)
    if script == "clip_student":
        data_args, args = module.parse_args(argv)
        assert args.teacher_name_or_path
    else:
        data_args, arch, args = parse_args(argv, DataArguments, module.ArchitectureArguments, CLIPDistillationConfig)
        assert (REPO / arch.architecture).is_file() and not args.needs_teacher
    assert data_args.dataset_name and args.max_steps > 0
