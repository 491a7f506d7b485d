"""Checkpoints that survive a kill: written aside and renamed into place when complete, found only when complete.

:class:`AtomicCheckpoints` (mixed into both trainers) lets ``Trainer`` write ``checkpoint-N`` into
``<output_dir>/.partial/`` and renames it to ``<output_dir>/checkpoint-N`` once every file is there, so a kill in
the middle of a save (preemption, OOM-kill) leaves no ``checkpoint-N`` that looks finished. :func:`latest_checkpoint`
is the one way mmkd finds what to resume from: the newest checkpoint whose state, weights, optimizer, scheduler and
RNG files are present and readable; older partial folders (an interrupted save of an earlier mmkd, a copy cut
short) are skipped with a warning naming them. :func:`resolve_resume` turns ``--resume_from_checkpoint
true|latest|PATH`` into that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpoints", "IncompleteCheckpoint", "check_checkpoint", "latest_checkpoint", "resolve_resume"]

PARTIAL_DIR = ".partial"
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LATEST = ("true", "latest")


class IncompleteCheckpoint(ValueError):
    """A checkpoint folder lacks a file, or a file cannot be read."""


def _torch_file_ok(path: Path) -> bool:
    """``torch.save`` writes a zip archive whose directory is at its end: a truncated file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _safetensors_ok(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            # the header is at the start; a cut-off file still has it, so also read the last tensor's bytes
            return bool(keys) and f.get_slice(keys[-1])[...] is not None
    except Exception:  # safetensors raises its own error types for a bad header or short data
        return False


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _weights_problem(path: Path) -> str | None:
    """``None`` if the model weights are there in a layout ``Trainer`` writes -- safetensors (sharded or not),
    ``pytorch_model.bin``, a PEFT adapter, FSDP's ``pytorch_model_fsdp_*`` folders, a DeepSpeed ``global_step*``
    folder -- else the file that is missing or unreadable."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            return index.name
        return next((shard for shard in shards if not _safetensors_ok(path / shard)), None)
    for name, ok in (("adapter_model.safetensors", _safetensors_ok), ("pytorch_model.bin", _torch_file_ok)):
        if (path / name).exists():
            return None if ok(path / name) else name
    if any(_nonempty_dir(d) for d in (*path.glob("pytorch_model_fsdp_*"), *path.glob("global_step*"))):
        return None
    return None if _safetensors_ok(path / "model.safetensors") else "model.safetensors"


def check_checkpoint(path: str | Path, *, require_optimizer: bool = True) -> Path:
    """``path`` if it is a complete, readable ``Trainer`` checkpoint, else :class:`IncompleteCheckpoint` naming what
    is missing or unreadable. Without ``require_optimizer`` (``save_only_model``) only state and weights count.
    FSDP (``optimizer_0/``) and DeepSpeed (``global_step*/``, which holds the optimizer and scheduler) layouts
    count as complete when their folders are there and not empty."""
    path = Path(path)
    if not path.is_dir():
        raise IncompleteCheckpoint(f"{path} is not a checkpoint folder")
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        raise IncompleteCheckpoint(f"{path}: no readable trainer_state.json") from None
    missing = _weights_problem(path)
    if missing:
        raise IncompleteCheckpoint(f"{path}: missing or unreadable weights {missing}")
    if require_optimizer:
        deepspeed = any(_nonempty_dir(d) for d in path.glob("global_step*"))
        optimizer = (deepspeed or _torch_file_ok(path / "optimizer.pt") or _torch_file_ok(path / "optimizer.bin")
                     or any(_nonempty_dir(d) for d in path.glob("optimizer_*")))
        if not optimizer:
            raise IncompleteCheckpoint(f"{path}: missing or unreadable optimizer state (optimizer.pt)")
        if not deepspeed and not _torch_file_ok(path / "scheduler.pt"):
            raise IncompleteCheckpoint(f"{path}: missing or unreadable scheduler.pt")
        rng = sorted(path.glob("rng_state*.pth"))
        if not rng or not all(_torch_file_ok(p) for p in rng):
            raise IncompleteCheckpoint(f"{path}: missing or unreadable RNG state (rng_state*.pth)")
    return path


def latest_checkpoint(output_dir: str | Path, *, require_optimizer: bool = True) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (by step), or ``None``; incomplete ones are skipped with a
    warning naming each."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _STEP.match(p.name))),
        reverse=True,
    )
    problems = []
    for _, path in steps:
        try:
            return check_checkpoint(path, require_optimizer=require_optimizer)
        except IncompleteCheckpoint as err:
            logger.warning("skipping an incomplete checkpoint: %s", err)
            problems.append(str(err))
    if problems:  # checkpoints are there but none is usable: restarting would train over (and rotate away) them
        raise IncompleteCheckpoint(f"none of the {len(problems)} checkpoint folder(s) in {output_dir} is complete "
                                   f"({problems[0]}); resume from a path or move them away")
    return None


def resolve_resume(value: str | None, output_dir: str | Path, *, require_optimizer: bool = True) -> str | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: ``true`` / ``latest`` -> the latest complete
    checkpoint of ``output_dir`` (``None``, with a line saying so, when there is none: training starts from the
    beginning); a path -> that path, checked complete; ``None`` -> ``None``."""
    if value is None or value == "":
        return None
    if str(value).lower() in LATEST:
        try:
            found = latest_checkpoint(output_dir, require_optimizer=require_optimizer)
        except IncompleteCheckpoint as err:
            raise ValueError(f"resume_from_checkpoint={value}: {err}") from None
        if found is None:
            logger.warning("resume_from_checkpoint=%s: no complete checkpoint in %s; training from the start", value,
                           output_dir)
            return None
        return str(found)
    try:
        return str(check_checkpoint(value, require_optimizer=require_optimizer))
    except IncompleteCheckpoint as err:
        raise ValueError(f"resume_from_checkpoint={value}: {err}") from None


class AtomicCheckpoints:
    """Mix into a ``Trainer`` subclass (before ``Trainer``): each checkpoint is written under ``.partial/`` and
    renamed to its final name when complete, then the usual rotation (``save_total_limit``) runs."""

    _staging: Path | None = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, with ``resume_from_checkpoint=True`` (or ``"latest"``) meaning the latest *complete*
        checkpoint (:func:`resolve_resume`), as on the recipes' command line."""
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in LATEST:
            resume_from_checkpoint = resolve_resume("latest", self.args.output_dir,
                                                    require_optimizer=not self.args.save_only_model)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        final_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = final_dir / PARTIAL_DIR
        if self.args.should_save and (staging / name).exists():
            shutil.rmtree(staging / name)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
        if self.args.should_save:
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(final_dir / Path(self.state.best_model_checkpoint).name)
                _fix_best_checkpoint(staging / name / "trainer_state.json", self.state.best_model_checkpoint)
            target = final_dir / name
            old = staging / f"{name}.replaced"
            if target.exists():  # the same step saved again (a resumed run): moved aside, never half deleted
                os.replace(target, old)
            os.replace(staging / name, target)
            _fsync_dir(final_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(final_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def _fix_best_checkpoint(state_file: Path, best: str) -> None:
    """Point the staged ``trainer_state.json``'s ``best_model_checkpoint`` at the final folder, not the staging one
    (a resumed run would find no such folder and stop protecting the best checkpoint from rotation)."""
    state = json.loads(state_file.read_text())
    state["best_model_checkpoint"] = best
    tmp = state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state_file)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)
