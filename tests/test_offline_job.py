"""recipes/offline_job.py: the README's main job, reduced (tiny models, tiny IDX files), end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from accelerate import PartialState
from huggingface_hub import ModelCard
from PIL import Image
from transformers import CLIPModel

from tests.conftest import REPO, TINY_OPEN_CLIP_CONFIG, load_recipe
from tests.test_checkpoints import write_checkpoint
from tests.test_fashion_mnist import write_split

offline_job = load_recipe("offline_job")


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """48 train and 20 test images whose brightness grows with the label, so even tiny models learn something."""
    root = tmp_path_factory.mktemp("fmnist-job")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (rng.integers(0, 60, size=(n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_split(root, split, images, labels)
    return root


def job_argv(out, data_dir, steps=3):
    overrides = ("--per_device_train_batch_size 8 --save_strategy no --report_to none --use_cpu true "
                 "--logging_steps 1 --warmup_steps 0")
    return ["--config", str(REPO / "recipes/configs/offline_job.yaml"), "--output_dir", str(out),
            "--architecture", str(TINY_OPEN_CLIP_CONFIG), "--max_steps", str(steps), "--max_train_samples", "48",
            "--data_dir", str(data_dir), "--train_overrides", overrides, "--bias_permutations", "200",
            "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, fmnist_dir):
    out = tmp_path_factory.mktemp("job") / "offline"
    return out, offline_job.main(job_argv(out, fmnist_dir))


def test_three_models_trained_with_the_same_budget(job):
    out, results = job
    rows = {r["model"]: r for r in results["models"]}
    assert list(rows) == ["teacher", "distilled", "scratch"]
    assert rows["teacher"]["layers"] == "4+4" and rows["distilled"]["layers"] == rows["scratch"]["layers"] == "2+2"
    assert {r["steps"] for r in rows.values()} == {3}
    for name, row in rows.items():
        model = CLIPModel.from_pretrained(out / name)
        assert row["parameters"] == sum(p.numel() for p in model.parameters())

    distilled = json.loads((out / "distilled/config.json").read_text())["distillation_init"]
    scratch = json.loads((out / "scratch/config.json").read_text())["distillation_init"]
    assert distilled["strategy"] == "every_other" and distilled["vision_layers"] == [0, 2]
    assert scratch["strategy"] == "random"
    cfg = json.loads((out / "scratch/training_config.json").read_text())
    assert cfg["affinity_weight"] == cfg["image_distill_weight"] == cfg["triplet_weight"] == 0
    assert cfg["learning_rate"] == 0.001  # the teacher config's from-scratch learning rate
    assert json.loads((out / "scratch/training_summary.json").read_text())["teacher_embeddings"] == "none"
    assert json.loads((out / "distilled/training_summary.json").read_text())["teacher_embeddings"] == "live"


def test_results_are_the_evaluators_numbers(job, fmnist_dir):
    from mmkd.data.fashion_mnist import DEFAULT_TEMPLATES, fashion_mnist_classification
    from mmkd.eval.zeroshot import evaluate_zeroshot

    out, results = job
    assert results["num_test_images"] == 20
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == results["models"]
    direct = evaluate_zeroshot(str(out / "distilled"), fashion_mnist_classification("test", data_dir=fmnist_dir),
                               templates=[t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES], progress=False)
    row = next(r for r in results["models"] if r["model"] == "distilled")
    assert row["acc1"] == direct["acc1"] and row["acc5"] == direct["acc5"]
    teacher = next(r for r in results["models"] if r["model"] == "teacher")
    assert row["acc1_of_teacher"] == pytest.approx(row["acc1"] / teacher["acc1"])

    table = (out / "results.md").read_text()
    assert f"| distilled | 2+2 | {row['parameters']:,} | 3 |" in table
    assert f"| {100 * row['acc1']:.2f} | {100 * row['acc5']:.2f} |" in table
    for plot in saved["plots"].values():
        with Image.open(out / plot) as im:
            assert im.format == "PNG" and im.width > 300
    assert set(saved["bias"]["vs_teacher"]) == {"distilled", "scratch"}


def test_student_model_cards(job):
    out, results = job
    rows = {r["model"]: r for r in results["models"]}
    for name in ("distilled", "scratch"):
        card = ModelCard.load(out / name / "README.md")
        values = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert values["accuracy"] == round(100 * rows[name]["acc1"], 2)
        assert values["top_5_accuracy"] == round(100 * rows[name]["acc5"], 2)
        assert card.data.pipeline_tag == "zero-shot-image-classification"
        assert "recipes/offline_job.py" in card.text
    assert "vision layers [0, 2] and text layers [0, 2]" in ModelCard.load(out / "distilled/README.md").text
    assert "trained from scratch with no teacher" in ModelCard.load(out / "scratch/README.md").text


def test_rerun_reuses_finished_stages_and_retrains_changed_ones(job, fmnist_dir):
    out, _ = job
    weights = {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in ("teacher", "distilled", "scratch")}
    offline_job.main(job_argv(out, fmnist_dir))  # same arguments: nothing retrains
    assert weights == {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in weights}
    results = offline_job.main(job_argv(out, fmnist_dir, steps=4))  # new budget: every stage retrains
    assert {r["steps"] for r in results["models"]} == {4}
    assert all((out / n / "model.safetensors").stat().st_mtime_ns != weights[n] for n in weights)


class FakeRecipe:
    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def __call__(self, argv):
        self.calls.append(argv)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "training_summary.json").write_text(json.dumps({"global_step": len(self.calls)}))
        return {"global_step": len(self.calls)}


def test_run_stage_resumes_an_interrupted_run(tmp_path):
    folder, state = tmp_path / "teacher", PartialState()
    recipe = FakeRecipe(folder)
    offline_job.run_stage("teacher", recipe, ["--a", "1"], folder, overwrite=False, state=state)
    # Interrupted: the record says not complete and a checkpoint is there -> resume from the latest one.
    (folder / offline_job.STAGE_RECORD).write_text(json.dumps({"argv": ["--a", "1"], "complete": False}))
    for step in (5, 10):
        write_checkpoint(folder / f"checkpoint-{step}", step)
    (folder / "checkpoint-15").mkdir()  # a partial folder (a save cut short by an older version): skipped
    offline_job.run_stage("teacher", recipe, ["--a", "1"], folder, overwrite=False, state=state)
    assert recipe.calls[-1] == ["--a", "1", "--resume_from_checkpoint", str(folder / "checkpoint-10")]
    # Finished: reused, not called again.
    offline_job.run_stage("teacher", recipe, ["--a", "1"], folder, overwrite=False, state=state)
    assert len(recipe.calls) == 2
    # --overwrite: a fresh run, the old checkpoints gone.
    offline_job.run_stage("teacher", recipe, ["--a", "1"], folder, overwrite=True, state=state)
    assert recipe.calls[-1] == ["--a", "1"] and not list(folder.glob("checkpoint-*"))


def test_run_stage_refuses_a_foreign_folder(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "precious.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match="was not written by this job"):
        offline_job.run_stage("teacher", FakeRecipe(folder), [], folder, overwrite=False, state=PartialState())
    assert (folder / "precious.bin").exists()


def test_unknown_option_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        offline_job.main(["--output_dir", str(tmp_path), "--max_stepz", "3"])
    assert info.value.code == 2 and "max_stepz" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

