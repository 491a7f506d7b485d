"""img2dataset webdataset shards: which tars a ``shards=`` spec names, and the samples and members inside them.

A spec is a directory (its ``*.tar`` files in natural order), a glob (``cc3m/*.tar``), a brace pattern
(``cc3m/{00000..00331}.tar``; every expanded path must exist), one file, or a list of these. A shard holds, per
sample, consecutive members ``<key>.<ext>``: the image (``jpg``/``png``/``webp``), ``txt`` (the caption) and
``json`` (img2dataset's metadata: ``key``, ``caption``, ``url``, ``status``, ...). Tars are read sequentially
(``tarfile`` stream mode), so they may be gzip-compressed, and a damaged one yields the samples before the damage.
:func:`shard_for_process` gives each process of a hand-written distributed loop its part of a stream.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmkd.data.baddata import BadDataReport

if TYPE_CHECKING:
    import datasets

__all__ = [
    "caption_from_txt",
    "expand_braces",
    "natural_key",
    "resolve_shards",
    "shard_for_process",
    "tar_samples",
    "url_from_json",
]

logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


# Shard specifications ----------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{00000..00002}`` (zero-padded ranges) and ``{a,b}`` lists, nested or several.

    >>> expand_braces("cc3m/{00000..00002}.tar")
    ['cc3m/00000.tar', 'cc3m/00001.tar', 'cc3m/00002.tar']
    >>> expand_braces("{a,b}-{1..2}")
    ['a-1', 'a-2', 'b-1', 'b-2']
    """
    for match in _BRACE_GROUP.finditer(pattern):
        body = match.group(1)
        numeric = _NUMERIC_RANGE.fullmatch(body)
        if numeric:
            lo, hi = numeric.groups()
            padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo, hi))
            width = max(len(lo), len(hi)) if padded else 0
            step = 1 if int(hi) >= int(lo) else -1
            items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
        elif "," in body:
            items = body.split(",")
        else:
            continue  # a literal "{x}" is left alone, as the shell does
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [expanded for item in items for expanded in expand_braces(head + item + tail)]
    return [pattern]


def natural_key(path: str) -> list[Any]:
    """Sort key putting ``2.tar`` before ``10.tar``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _resolve_one(spec: str | os.PathLike) -> list[str]:
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        tars = sorted((str(p) for p in path.glob("*.tar")), key=natural_key)
        if not tars:
            raise FileNotFoundError(f"shards={text!r}: no .tar files in this directory")
        return tars
    if "{" in text:
        expanded = [os.path.expanduser(p) for p in expand_braces(text)]
        if len(expanded) > 1 or expanded[0] != os.path.expanduser(text):
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"shards={text!r}: {len(missing):,} of the {len(expanded):,} shards it names do not exist "
                    f"(first: {', '.join(missing[:3])}); narrow the range or use a glob such as '*.tar'"
                )
            return expanded
    if _GLOB_CHARS.search(text):
        matched = sorted(
            (p for p in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(p)),
            key=natural_key,
        )
        if not matched:
            raise FileNotFoundError(f"shards={text!r}: no files match this pattern")
        return matched
    if not path.is_file():
        raise FileNotFoundError(f"shards: no such file {text!r}")
    return [str(path)]


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard specification (see the module docstring) into an ordered list of existing tar paths, without
    repeats, or raise ``FileNotFoundError``."""
    if isinstance(shards, (str, os.PathLike)):
        specs = [shards]
    elif isinstance(shards, Sequence):
        specs = list(shards)
        if not specs:
            raise FileNotFoundError("shards=[]: no shards given")
    else:
        raise TypeError(f"shards must be a path, a pattern or a list of them, not {type(shards).__name__}")
    resolved: list[str] = []
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            raise TypeError(f"shards: {spec!r} is not a path")
        resolved.extend(_resolve_one(spec))
    return list(dict.fromkeys(resolved))  # drop repeats, keep order


# Reading shards ----------------------------------------------------------------------------------------------------
def tar_samples(shard: str, report: BadDataReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each run of consecutive members sharing a key (webdataset order).

    A shard that cannot be read to its end is counted once as "unreadable shard"; the samples before the damage
    are still yielded, the one being read when it happened is dropped.
    """
    current: str | None = None
    members: dict[str, bytes] = {}
    done = 0
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                stem, dot, ext = base.partition(".")
                if not dot or not stem or base.startswith("."):
                    continue  # not a webdataset member (no extension), or a hidden/resource-fork file
                key = posixpath.join(posixpath.dirname(member.name), stem)
                if key != current:
                    if current is not None:
                        yield current, members
                        done += 1
                    current, members = key, {}
                handle = tar.extractfile(member)
                members[ext.lower()] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        after = f"after {done:,} samples" + (f", in key {posixpath.basename(current)}" if current else "")
        report.seen += 1  # the sample being read (or the shard itself): a skip is always one of the items seen
        report.bad("unreadable shard", shard, f"{type(e).__name__}: {e}; {after}")
        return
    if current is not None:
        yield current, members


def caption_from_txt(raw: bytes | None) -> tuple[str | None, str]:
    """``(caption, "")`` from a ``.txt`` member, or ``(None, why not)``."""
    if raw is None:
        return None, "no .txt member"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, ".txt member is not UTF-8"
    return (text, "") if text else (None, "empty .txt member")


def url_from_json(raw: bytes | None) -> str | None:
    """The ``url`` of img2dataset's ``.json`` member, ``None`` if there is no usable one."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) and url else None


# Splitting a stream across processes ---------------------------------------------------------------------------
def shard_for_process(
    dataset: datasets.Dataset | datasets.IterableDataset,
    rank: int | None = None,
    world_size: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """This process's part of ``dataset``: ``datasets.distributed.split_dataset_by_node(dataset, rank, world_size)``.

    ``rank`` and ``world_size`` default to ``torch.distributed``'s when it is initialised, else to the ``RANK`` and
    ``WORLD_SIZE`` environment variables (``torchrun`` sets both), else to a single process. A stream whose number
    of shards is a multiple of ``world_size`` is split by shard (each process reads only its tars); otherwise every
    process reads every tar and keeps one sample in ``world_size``. The parts are disjoint and together complete.

    Not for the Hugging Face ``Trainer``: accelerate already splits each batch across processes.
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if world_size == 1:
        return dataset
    if isinstance(dataset, IterableDataset) and dataset.num_shards % world_size:
        logger.info(
            "%d shards do not divide among %d processes: each process reads every shard and keeps 1 sample in %d",
            dataset.num_shards,
            world_size,
            world_size,
        )
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
