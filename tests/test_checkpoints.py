"""Checkpoints that survive a kill: complete or invisible, the latest complete one found, resumed to the same
weights as a run that was never interrupted -- including a real ``kill -9`` in the middle of a save."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmkd.trainers.checkpoints import (
    IncompleteCheckpoint,
    check_checkpoint,
    latest_checkpoint,
    resolve_resume,
)
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"


def write_checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint in Trainer's layout (small tensors, real formats)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    return folder


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no readable trainer_state.json"),
        (lambda c: (c / "trainer_state.json").write_text("{"), "no readable trainer_state.json"),
        (lambda c: (c / "model.safetensors").unlink(), "weights model.safetensors"),
        (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-3]),
         "weights model.safetensors"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt"),
        (lambda c: (c / "scheduler.pt").write_bytes((c / "scheduler.pt").read_bytes()[:40]), "scheduler.pt"),
        (lambda c: (c / "rng_state.pth").unlink(), "RNG state"),
    ],
)
def test_an_incomplete_checkpoint_is_named_with_what_it_lacks(tmp_path, damage, expected):
    ckpt = write_checkpoint(tmp_path / "checkpoint-3", 3)
    assert check_checkpoint(ckpt) == ckpt
    damage(ckpt)
    with pytest.raises(IncompleteCheckpoint, match=expected):
        check_checkpoint(ckpt)


def test_latest_complete_checkpoint_skips_partial_ones_with_a_warning(tmp_path, caplog):
    for step in (2, 4, 10):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-10" / "optimizer.pt").unlink()  # an older run killed mid-save
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / ".partial" / "checkpoint-14").mkdir(parents=True)  # never seen: not under its final name
    with caplog.at_level(logging.WARNING, logger="mmkd.trainers.checkpoints"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-12" in warned and "checkpoint-10" in warned and "optimizer.pt" in warned
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_values(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("true", tmp_path) is None  # nothing yet: from the start
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    for value in ("true", "latest", "True"):
        assert resolve_resume(value, tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path) == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="resume_from_checkpoint=.*checkpoint-9: .*not a checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)


def _state_and_rng(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    return folder


def test_every_layout_trainer_writes_counts_as_complete(tmp_path):
    fsdp = _state_and_rng(tmp_path / "fsdp" / "checkpoint-2", 2)  # FSDP: sharded weights and optimizer folders
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        (fsdp / sub).mkdir()
        torch.save({"x": 1}, fsdp / sub / "__0_0.distcp")
    torch.save({}, fsdp / "scheduler.pt")
    deepspeed = _state_and_rng(tmp_path / "ds" / "checkpoint-2", 2)  # DeepSpeed: its own folder holds them all
    (deepspeed / "global_step2").mkdir()
    torch.save({"x": 1}, deepspeed / "global_step2" / "mp_rank_00_model_states.pt")
    only_model = tmp_path / "only" / "checkpoint-2"
    only_model.mkdir(parents=True)
    (only_model / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({"w": torch.zeros(1)}, only_model / "pytorch_model.bin")  # save_only_model, the .bin format
    assert check_checkpoint(fsdp) == fsdp and check_checkpoint(deepspeed) == deepspeed
    assert check_checkpoint(only_model, require_optimizer=False) == only_model
    with pytest.raises(IncompleteCheckpoint, match="optimizer"):
        check_checkpoint(only_model)
    (fsdp / "optimizer_0" / "__0_0.distcp").unlink()
    with pytest.raises(IncompleteCheckpoint, match="optimizer"):
        check_checkpoint(fsdp)


def test_latest_refuses_when_checkpoints_exist_but_none_is_complete(tmp_path):
    """Training from step 0 over them would rotate them away: the run stops and says so instead."""
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    (tmp_path / "checkpoint-4" / "scheduler.pt").unlink()
    with pytest.raises(IncompleteCheckpoint, match="none of the 1 checkpoint folder"):
        latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="resume_from_checkpoint=latest: none of the 1 .*scheduler.pt"):
        resolve_resume("latest", tmp_path)


def test_trainer_train_true_means_the_latest_complete_checkpoint(tmp_path):
    from types import SimpleNamespace

    from mmkd.trainers.checkpoints import AtomicCheckpoints

    class Loop:
        def train(self, resume_from_checkpoint=None, **kwargs):
            return resume_from_checkpoint

    class Trainer(AtomicCheckpoints, Loop):
        args = SimpleNamespace(output_dir=str(tmp_path), save_only_model=False)

    for step in (2, 4):
        write_checkpoint(tmp_path / f"checkpoint-{step}", step)
    (tmp_path / "checkpoint-4" / "rng_state.pth").unlink()  # Trainer's own finder would pick this one
    assert Trainer().train(True) == str(tmp_path / "checkpoint-2")
    assert Trainer().train("latest") == str(tmp_path / "checkpoint-2")
    assert Trainer().train(None) is None


def test_the_staged_state_names_the_final_best_checkpoint(tmp_path):
    from mmkd.trainers.checkpoints import _fix_best_checkpoint

    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 4, "best_model_checkpoint": str(tmp_path / ".partial/checkpoint-4")}))
    _fix_best_checkpoint(state, str(tmp_path / "checkpoint-4"))
    assert json.loads(state.read_text()) == {"global_step": 4, "best_model_checkpoint": str(tmp_path / "checkpoint-4")}


def test_a_checkpoint_is_visible_only_once_complete(tmp_path, monkeypatch):
    from mmkd.trainers import CLIPDistillationTrainer

    recipe, out, seen = load_recipe("clip_student"), tmp_path / "run", []
    save_rng = CLIPDistillationTrainer._save_rng_state

    def spy(self, output_dir):  # the last files of a save: the folder must not be visible under its name yet
        seen.append((Path(output_dir), (out / Path(output_dir).name).exists()))
        save_rng(self, output_dir)

    monkeypatch.setattr(CLIPDistillationTrainer, "_save_rng_state", spy)
    recipe.main(["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "32",
                 "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "2",
                 "--report_to", "none", "--use_cpu", "true"])
    assert [(p.parent.name, p.name, visible) for p, visible in seen] == [
        (".partial", "checkpoint-2", False), (".partial", "checkpoint-4", False)]
    assert check_checkpoint(out / "checkpoint-4") and check_checkpoint(out / "checkpoint-2")
    assert not (out / ".partial").exists()


def _argv(out: Path, steps: int) -> list[str]:
    return ["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "48",
            "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--save_steps", "2",
            "--save_total_limit", "3", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
            "--dataloader_num_workers", "0"]


def test_kill_9_in_the_middle_of_a_save_then_resume_gives_the_uninterrupted_weights(tmp_path):
    recipe = load_recipe("clip_student")
    reference = tmp_path / "reference"
    recipe.main(_argv(reference, 6))

    out, marker = tmp_path / "killed", tmp_path / "stalled-in-save"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_mid_save_script.py"), str(marker), "4",
                             *_argv(out, 6)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run never reached the save of checkpoint-4"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # The interrupted save is not under its final name; the one before it is complete.
    assert not (out / "checkpoint-4").exists() and (out / ".partial" / "checkpoint-4" / "optimizer.pt").is_file()
    assert latest_checkpoint(out) == out / "checkpoint-2"

    summary = recipe.main([*_argv(out, 6), "--resume_from_checkpoint", "latest"])
    assert summary["global_step"] == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (out / ".partial").exists()
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    diff = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    assert diff == 0.0
