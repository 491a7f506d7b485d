"""recipes/train_teacher.py: a CLIP trained from scratch becomes a transformers teacher the student recipe distils."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, TINY_OPEN_CLIP_CONFIG, load_recipe
from tests.test_fashion_mnist import write_split


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    labels = np.arange(40, dtype=np.uint8) % 10
    images = (rng.integers(0, 60, size=(40, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
    write_split(root, "train", images, labels)
    return root


def test_teacher_from_scratch_then_distilled(tmp_path, fmnist_dir):
    train_teacher, clip_student = load_recipe("train_teacher"), load_recipe("clip_student")
    teacher_dir = tmp_path / "teacher"
    common = ["--config", str(REPO / "recipes/configs/fashion_mnist_teacher.yaml"), "--dataset_name", "fashion_mnist",
              "--data_dir", str(fmnist_dir), "--max_train_samples", "40", "--per_device_train_batch_size", "8",
              "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--logging_steps", "1"]
    summary = train_teacher.main([*common, "--architecture", str(TINY_OPEN_CLIP_CONFIG), "--max_steps", "3",
                                  "--output_dir", str(teacher_dir)])
    assert summary["global_step"] == 3
    saved = json.loads((teacher_dir / "config.json").read_text())
    assert saved["architectures"] == ["CLIPModel"] and saved["vision_config"]["num_hidden_layers"] == 4

    from mmkd.teachers import TransformersCLIPTeacher, load_teacher

    teacher = load_teacher(str(teacher_dir))
    assert isinstance(teacher, TransformersCLIPTeacher)
    # The teacher trained: its weights differ from the random initialisation it started from (same seed).
    from transformers import set_seed

    set_seed(0)
    fresh = load_teacher(str(TINY_OPEN_CLIP_CONFIG)).to_transformers()
    assert not torch.allclose(fresh.visual_projection.weight, teacher.model.visual_projection.weight)

    student_dir = tmp_path / "student"
    student = clip_student.main([
        "--config", str(REPO / "recipes/configs/smoke.yaml"), "--teacher_name_or_path", str(teacher_dir),
        "--dataset_name", "fashion_mnist", "--data_dir", str(fmnist_dir), "--max_train_samples", "40",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--output_dir", str(student_dir),
    ])
    assert student["teacher"]["backend"] == "transformers" and student["global_step"] == 2
    assert student["student"]["init"]["vision_layers"] == [0, 2]


def test_distillation_weights_are_refused(tmp_path, capsys):
    train_teacher = load_recipe("train_teacher")
    with pytest.raises(SystemExit) as info:
        train_teacher.main(["--config", str(REPO / "recipes/configs/fashion_mnist_teacher.yaml"),
                            "--image_distill_weight", "1.0", "--affinity_weight", "0.5", "--output_dir", str(tmp_path)])
    assert info.value.code == 2
    assert "from scratch: set image_distill_weight, affinity_weight to 0" in capsys.readouterr().err
