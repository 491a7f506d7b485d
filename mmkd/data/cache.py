"""Precompute a teacher's embeddings once, as dataset columns, so distillation can train without the teacher.

``cache_teacher_embeddings(dataset, teacher, cache_dir)`` returns ``dataset`` with two more columns,
``teacher_image_embeds`` and ``teacher_text_embeds`` (the teacher's raw projected embeddings, float32), which
:class:`~mmkd.data.CLIPDistillationCollator` passes through and :class:`~mmkd.trainers.CLIPDistillationTrainer`
uses instead of running the teacher.

The cache is keyed by everything that determines its content: the teacher's name and a SHA-256 of its weights, its
image preprocessing and tokenizer (their signatures), the dataset's fingerprint and the two column names. A cache
written for anything else is refused with :class:`StaleCacheError` naming what differs, never silently reused.

A dataset whose image column holds file *paths* (an image folder, a ``save_to_disk`` table of paths, Conceptual
Captions' ``image_dir`` layout) keeps its fingerprint when a file is overwritten in place, so the images themselves
are part of the key: every file's size and modification time (one ``stat`` per row) plus the SHA-256 of the content
of a seeded sample of :data:`CONTENT_SAMPLE` files (which catches an edit that kept size and time). The list is
stored beside the embeddings, and a changed file makes the cache stale, naming the file. Images stored as bytes
in the table (generated sets, webdataset shards copied into Arrow) are covered by the fingerprint itself.

Only deterministic preprocessing is cached: the teacher's own validation transform (resize, centre crop,
normalise). Embeddings of randomly augmented views would be wrong for every other view of the same image.

Work is done in shards of ``shard_size`` rows, each written to ``<cache>/work/`` under a temporary name and renamed
when complete, so an interrupted run resumes at the first missing shard; the final dataset is assembled in a
temporary directory and renamed into place, so a crash never leaves a half-written cache that looks complete.
Under a multi-process launch the shards are split across processes; the main process alone decides whether an
interrupted run's work folder can be reused (its key, written atomically before any shard, must read back equal;
a torn or missing key clears the folder) while the others wait, so no process reads a key file another is writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmkd.teachers import FrozenTeacher

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "teacher_image_embeds"
TEXT_COLUMN = "teacher_text_embeds"
META_FILE = "mmkd_cache.json"
FILES_FILE = "image_files.json"
FORMAT_VERSION = 2
CONTENT_SAMPLE = 64  # image files whose content is hashed (the others: size and modification time)


class StaleCacheError(ValueError):
    """A cache exists but was written for another teacher, preprocessing or dataset."""


def image_files(dataset, image_column: str) -> list[list] | None:
    """``[path, size, mtime_ns, sha256 or None]`` of every image the dataset reads by path (``None`` when its images
    are stored as bytes); the content hash for a seeded sample of :data:`CONTENT_SAMPLE` files only."""
    import datasets
    import numpy as np

    if not isinstance(dataset.features.get(image_column), datasets.Image):
        return None
    import pyarrow.compute as pc

    raw = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    column = raw.data.column(image_column) if raw._indices is None else raw.with_format("arrow")[:][image_column]
    # (N,) struct<bytes, path>: only the null test touches the bytes, never copied into Python objects
    by_path = pc.is_null(pc.struct_field(column, "bytes"))
    if not pc.any(by_path).as_py():
        return None
    paths = [p if keep else None for p, keep in zip(pc.struct_field(column, "path").to_pylist(), by_path.to_pylist(),
                                                    strict=True)]
    files = []
    for path in paths:
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        files.append([path, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1, None])
    with_path = [i for i, f in enumerate(files) if f[0]]
    for i in np.random.default_rng(0).permutation(len(with_path))[:CONTENT_SAMPLE]:
        entry = files[with_path[i]]
        try:
            entry[3] = hashlib.sha256(Path(entry[0]).read_bytes()).hexdigest()
        except OSError:
            entry[3] = "unreadable"
    return files


def _files_digest(files: list[list] | None) -> str | None:
    return None if files is None else hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _changed_file(stored: list[list], now: list[list] | None) -> str:
    """The first image that differs between two :func:`image_files` lists, in words."""
    if now is None or len(stored) != len(now):
        return f"the image files changed ({len(stored)} then, {0 if now is None else len(now)} now)"
    for (path, size, mtime, digest), (path_now, size_now, mtime_now, digest_now) in zip(stored, now, strict=True):
        if path != path_now:
            return f"image {path} is now {path_now}"
        if size != size_now or mtime != mtime_now:
            return f"image file {path} changed since the cache was written (size {size} -> {size_now} bytes)"
        if digest != digest_now:
            return f"image file {path} changed since the cache was written (same size and time, other content)"
    return "the image files changed"


def teacher_identity(teacher: FrozenTeacher, inputs=None) -> dict:
    """What embeddings depend on of the teacher: name, backend, weight hash, image preprocessing and tokenizer
    signatures (shared by this cache and :mod:`mmkd.data.sidecars`); ``inputs``: ``teacher.inputs()`` if built."""
    inputs = inputs or teacher.inputs()
    return {
        "teacher": teacher.name,
        "teacher_backend": teacher.backend,
        "teacher_weights_sha256": teacher.weights_hash(),
        "image_preprocessing": inputs.image_signature,
        "tokenizer": inputs.text_signature,
    }


def cache_key(teacher: FrozenTeacher, dataset, image_column: str, text_column: str, files=None) -> dict:
    """Everything the cached embeddings depend on, as a JSON-able dict (``files``: :func:`image_files`)."""
    key = {
        "format_version": FORMAT_VERSION,
        **teacher_identity(teacher),
        "dataset_fingerprint": dataset._fingerprint,
        "num_rows": len(dataset),
        "image_column": image_column,
        "text_column": text_column,
        "image_files_sha256": _files_digest(files),
    }
    return json.loads(json.dumps(key))  # the form it has once stored: tuples become lists


def _digest(key: dict) -> str:
    """The cache folder's name: the key without the image files' state, so an edited image finds the old folder
    and is refused as stale (naming the file) instead of being cached again beside it."""
    identity = {k: v for k, v in key.items() if k != "image_files_sha256"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def check_cache(path: str | Path, key: dict, files: list[list] | None = None) -> None:
    """Raise :class:`StaleCacheError` naming each field where the cache at ``path`` differs from ``key`` (and the
    first changed image file, with ``files``)."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise StaleCacheError(f"{path} is not an mmkd embedding cache (no {META_FILE})")
    stored = json.loads(meta_path.read_text())
    if stored.get("image_files_sha256") != key.get("image_files_sha256"):
        files_path = Path(path) / FILES_FILE
        what = _changed_file(json.loads(files_path.read_text()), files) if files_path.is_file() else "images changed"
        raise StaleCacheError(f"teacher-embedding cache {path} is stale: {what}; delete {path} (or choose another "
                              "teacher_cache_dir) to compute the embeddings again")
    diffs = [k for k in sorted(set(key) | set(stored)) if key.get(k) != stored.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: cache has {stored.get(k)!r}, now {key.get(k)!r}" for k in diffs)
        raise StaleCacheError(f"teacher-embedding cache {path} was written for something else ({detail})")


@torch.no_grad()
def _embed_shard(shard, teacher: FrozenTeacher, inputs, image_column: str, text_column: str, batch_size: int, device):
    image_embeds, text_embeds = [], []
    for start in range(0, len(shard), batch_size):
        rows = shard[start : start + batch_size]
        pixels = inputs.images(rows[image_column]).to(device)  # (B, 3, H, W)
        tokens = {k: v.to(device) for k, v in inputs.texts(rows[text_column]).items()}
        image_embeds.append(teacher.encode_image(pixels).float().cpu())  # (B, E)
        text_embeds.append(teacher.encode_text(tokens["input_ids"], tokens.get("attention_mask")).float().cpu())
    return torch.cat(image_embeds).numpy(), torch.cat(text_embeds).numpy()


def _prepare_work(work: Path, key: dict) -> None:
    """Make ``work`` the shard folder of ``key``: an interrupted run's shards are kept only when its key (written
    before any shard) reads back equal; a folder with another key, a torn or missing key file is cleared. The key
    is written to a temporary file and renamed, so a kill never leaves a torn one."""
    try:
        reusable = json.loads((work / META_FILE).read_text()) == key
    except (OSError, ValueError):
        reusable = False
    if not reusable and work.exists():
        shutil.rmtree(work)  # shards over other images, or of a run killed before its key was complete
    work.mkdir(parents=True, exist_ok=True)
    if not reusable:
        tmp = work / f"{META_FILE}.tmp"
        tmp.write_text(json.dumps(key, indent=2))
        os.replace(tmp, work / META_FILE)


def cache_teacher_embeddings(
    dataset,
    teacher: FrozenTeacher,
    cache_dir: str | Path,
    *,
    image_column: str = "image",
    text_column: str = "text",
    batch_size: int = 256,
    shard_size: int = 4096,
    accelerator=None,
):
    """Return ``dataset`` with the teacher's image and text embeddings as columns, computed once and cached.

    The cache lives in ``cache_dir/<key digest>/``; a later call with the same teacher, preprocessing and dataset
    loads it without running the teacher. See the module docstring for keying, resuming and atomicity.
    """
    import datasets
    from datasets import Dataset

    for col in (image_column, text_column):
        if col not in dataset.column_names:
            raise ValueError(f"dataset has no column {col!r}; its columns are {dataset.column_names}")
    for col in (IMAGE_COLUMN, TEXT_COLUMN):
        if col in dataset.column_names:
            raise ValueError(f"dataset already has a {col!r} column")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be >= 1")

    files = image_files(dataset, image_column)
    key = cache_key(teacher, dataset, image_column, text_column, files)
    final = Path(cache_dir) / _digest(key)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else teacher.device
    if not final.is_dir():
        work = final.parent / f"{final.name}.work"
        if rank == 0:  # one process decides what an earlier run left; the others wait for it
            _prepare_work(work, key)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        n_shards = max(1, -(-len(dataset) // shard_size))
        inputs = teacher.inputs()  # built once: its signatures hash the whole vocabulary
        for i in range(rank, n_shards, world):
            done = work / f"shard-{i:05d}"
            if done.is_dir():
                continue  # finished by an earlier, interrupted run
            shard = dataset.select(range(i * shard_size, min((i + 1) * shard_size, len(dataset))))
            img, txt = _embed_shard(shard, teacher, inputs, image_column, text_column, batch_size, device)
            tmp = work / f"shard-{i:05d}.tmp-{rank}"
            shutil.rmtree(tmp, ignore_errors=True)
            Dataset.from_dict({IMAGE_COLUMN: list(img), TEXT_COLUMN: list(txt)}).save_to_disk(tmp)
            os.replace(tmp, done)
            logger.info("cached teacher embeddings for shard %d/%d", i + 1, n_shards)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if rank == 0:
            parts = datasets.concatenate_datasets(
                [datasets.load_from_disk(work / f"shard-{i:05d}") for i in range(n_shards)]
            )
            assembling = final.parent / f"{final.name}.tmp"
            shutil.rmtree(assembling, ignore_errors=True)
            parts.save_to_disk(assembling)
            (assembling / META_FILE).write_text(json.dumps(key, indent=2))
            if files is not None:
                (assembling / FILES_FILE).write_text(json.dumps(files))
            os.replace(assembling, final)
            shutil.rmtree(work, ignore_errors=True)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    check_cache(final, key, files)
    embeds = datasets.load_from_disk(final)
    if len(embeds) != len(dataset):
        raise StaleCacheError(f"cache {final} has {len(embeds)} rows, the dataset {len(dataset)}")
    return datasets.concatenate_datasets([dataset, embeds], axis=1)


def load_cached_embeddings(dataset, teacher: FrozenTeacher, path: str | Path, *, image_column="image", text_column="text"):
    """Attach the embeddings cached at ``path`` (a ``cache_dir/<digest>`` folder) after checking they fit."""
    import datasets

    files = image_files(dataset, image_column)
    check_cache(path, cache_key(teacher, dataset, image_column, text_column, files), files)
    return datasets.concatenate_datasets([dataset, datasets.load_from_disk(path)], axis=1)
