"""recipes/match_student.py: the three experiments, the table, the cache path, the sweep and a 2-process launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPProcessor

from mmkd.matching import CLIPMatcher, ResNetMiniLMMatcher, load_text_tokenizer
from mmkd.matching.collator import MatchCollator, student_inputs
from mmkd.matching.metrics import match_metrics
from tests.conftest import REPO, load_recipe
from tests.test_offline_job import fmnist_dir  # noqa: F401  (fixture: tiny Fashion-MNIST IDX files)

match_student = load_recipe("match_student")


def recipe_argv(out, data_dir, clip_dir, stage="all", steps=3, *extra):
    return ["--config", str(REPO / "recipes/configs/match_fashion_mnist.yaml"), "--stage", stage,
            "--output_dir", str(out), "--data_dir", str(data_dir), "--clip_name_or_path", str(clip_dir),
            "--max_train_examples", "48", "--max_eval_examples", "20", "--stage_max_steps", str(steps),
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
    from mmkd.data.matching import fashion_mnist_matching

    pairs = fashion_mnist_matching(fmnist_dir, seed=0, max_train_examples=48, max_eval_examples=20)
    student = ResNetMiniLMMatcher.from_pretrained(out / "baseline")
    collator = MatchCollator(student_inputs(student, load_text_tokenizer(str(out / "baseline"))))
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


def test_cached_teacher_logits_train_the_same_student(trained, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    out, rows = trained
    cached = match_student.main(recipe_argv(out, fmnist_dir, tiny_hf_clip_dir, "distill", 3,
                                            "--cache_teacher_logits", "true"))
    live, again = rows[2], cached[2]
    for metric in ("accuracy", "f1", "roc_auc"):
        assert again[metric] == pytest.approx(live[metric], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(live["eval_loss"], rel=1e-4)


def test_sweep_writes_the_grid(trained, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    out, _ = trained
    runs = match_student.main(recipe_argv(out, fmnist_dir, tiny_hf_clip_dir, "sweep", 2,
                                          "--sweep_alphas", "0.25,0.75", "--sweep_temperatures", "3"))
    assert [(r["alpha"], r["temperature"]) for r in runs] == [(0.25, 3.0), (0.75, 3.0)]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["runs"] == runs
    md = (out / "sweep.md").read_text()
    assert f"| 0.75 | {100 * runs[1]['f1']:.2f} |" in md
    assert (out / "sweep.png").stat().st_size > 1000


def test_bad_stage_and_missing_teacher(tmp_path, fmnist_dir, tiny_hf_clip_dir):  # noqa: F811
    with pytest.raises(SystemExit, match="--stage 'teach'"):
        match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "teach"))
    with pytest.raises(SystemExit, match="run --stage teacher first"):
        match_student.main(recipe_argv(tmp_path, fmnist_dir, tiny_hf_clip_dir, "distill"))


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
