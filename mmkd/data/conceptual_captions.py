"""Conceptual Captions (CC3M) from the official TSV and images already on disk, as a ``datasets`` dataset.

:func:`load_conceptual_captions` reads the images a user has downloaded (mmkd never downloads anything) and returns
a ``datasets.Dataset`` or, with ``streaming=True``, a ``datasets.IterableDataset`` with the columns ``image``
(``datasets.Image(mode="RGB")``), ``text`` (the caption), ``url`` (from img2dataset's ``.json`` member or the TSV
row, else ``None``) and ``key`` (the img2dataset sample key, a 9-digit row number such as ``"000010003"``).

Layouts
-------
1. **img2dataset webdataset shards** (``shards=``: a directory, glob, brace pattern such as
   ``cc3m/{00000..00331}.tar`` or list; see :mod:`mmkd.data.webdataset`): ``00000.tar``, ``00001.tar``, ... each
   holding ``<key>.jpg`` (or ``.png``/``.webp``), ``<key>.txt`` (the caption) and ``<key>.json`` per sample. The
   ``<shard>_stats.json`` and ``<shard>.parquet`` files img2dataset writes beside them are ignored.
2. **A folder of images keyed by TSV row** (``image_dir=`` with ``tsv=``): ``<dir>/12.jpg``, or zero-padded and
   nested as img2dataset's ``--output_format files`` writes it, ``<dir>/00000/000000012.jpg`` (any depth, names
   ``<row>.jpg|.jpeg|.png|.webp``). Each TSV row is matched to its image; the caption comes from the row.

The TSV is ``caption<TAB>url`` per line; a ``caption<TAB>url`` header line (which img2dataset needs, see below) is
skipped, so row 0 is the first data line either way; error messages give 1-based file lines. A row is malformed
unless it has exactly two columns, a non-empty caption and an ``http(s)://`` URL. With shards the caption is the
``.txt`` member; a TSV given alongside is only a fallback: its row (the key read as a number) gives the caption of
a sample whose ``.txt`` is missing, empty or not UTF-8, and the URL when the ``.json`` is missing. Keys are row
numbers only with img2dataset's default ``--number_sample_per_shard 10000`` (any power of ten), so when the
``.json`` URL differs from the row's, the row is not used and the sample is skipped as "missing caption". The
``.json``'s own ``caption`` is never used: a sample with a ``.json`` but no ``.txt`` was not written completely.

Bad data
--------
Everything goes through :class:`~mmkd.data.baddata.BadDataReport`: a corrupt or truncated image, a sample with no
caption or no image member, an unreadable (truncated, not-a-tar) shard and a malformed TSV row are skipped and
counted, and one summary line names the first few offenders (shard and key, or TSV line); a truncated shard keeps
the samples before the damage. ``strict=True`` raises :class:`~mmkd.data.baddata.BadDataError` on the first one
instead. Images are checked by decoding them (JPEGs at 1/8 scale, which reads every byte of the scan), so a bad
file is found here rather than in a data-loader worker mid-training.

Dead URLs: 10-30% of CC3M's URLs no longer serve an image, so in the ``image_dir`` layout most TSV rows without an
image file are expected: counted as "missing image" but not listed as offenders (the list shows real corruption),
and not an error. ``strict=True`` still raises on the first one ("every row must be usable", which suits a TSV
filtered to the downloaded rows, not the raw CC3M TSV). Dead URLs never reach the tars (img2dataset's parquet
files record them).

Map-style or streaming
----------------------
The map-style dataset is written once (``Dataset.from_generator``) into an Arrow cache (``cache_dir``, default the
``datasets`` cache) and memory-mapped. From shards it holds a copy of every image's bytes (about the shards' size:
tens of GB for CC3M's 3.3M images at 256 px) and is reused while the shard and TSV files keep their sizes and
modification times; from ``image_dir`` it stores paths (the images must stay in place) and is reused while the TSV
and the folder's file names are unchanged. The summary line is logged when the cache is written, not on a hit.

``streaming=True`` reads the shards on the fly, one ``datasets`` shard per tar, so each ``DataLoader`` worker reads
its own tars and :func:`shard_for_process` splits them across processes; each shard logs its summary line when it
is done. An ``image_dir`` stream is split into blocks of 10,000 TSV rows and indexes the folder in memory (about
100 bytes per image: for all 3.3M images the shards are the better layout). Under the Hugging Face ``Trainer`` pass
the stream unsplit (accelerate gives every process its part of each batch); :func:`shard_for_process` is for
hand-written loops where each process builds its own ``DataLoader``.

Getting the images
------------------
1. Download ``Train_GCC-training.tsv`` (about 500 MB, 3.3M rows) and ``Validation_GCC-1.1.0-Validation.tsv``
   from https://ai.google.com/research/ConceptualCaptions/download.
2. Add the header line img2dataset takes column names from, as its CC3M example does (mmkd skips it)::

       sed -i '1s/^/caption\\turl\\n/' Train_GCC-training.tsv

3. ``pip install img2dataset`` and download (``--output_format files`` gives the ``image_dir`` layout instead)::

       img2dataset --url_list Train_GCC-training.tsv --input_format tsv --url_col url --caption_col caption \\
           --output_format webdataset --output_folder cc3m --processes_count 16 --thread_count 64 \\
           --image_size 256 --enable_wandb False

   This writes ``cc3m/00000.tar`` ... ``cc3m/00331.tar`` (10,000 rows per shard; keep that default so keys are TSV
   row numbers). Then::

       ds = load_conceptual_captions("Train_GCC-training.tsv", shards="cc3m/{00000..00331}.tar", streaming=True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mmkd.data.baddata import BadDataError, BadDataReport, probe_image
from mmkd.data.webdataset import (  # expand_braces, resolve_shards, shard_for_process: re-exported
    caption_from_txt,
    expand_braces,
    natural_key,
    resolve_shards,
    shard_for_process,
    tar_samples,
    url_from_json,
)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "IMAGE_EXTENSIONS", "SPLIT_TSV", "expand_braces", "load_conceptual_captions", "resolve_shards", "shard_for_process"
]

logger = logging.getLogger(__name__)

# The official file name of each split, looked up when ``tsv`` is a directory.
SPLIT_TSV = {"train": "Train_GCC-training.tsv", "validation": "Validation_GCC-1.1.0-Validation.tsv"}

# Extensions of image members / files (img2dataset writes ``jpg``, or ``png``/``webp`` with --encode_format).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Rows per stream shard in the image_dir layout (img2dataset's default shard size).
ROWS_PER_BLOCK = 10_000

# Bumped whenever the rows written to the Arrow cache change, so stale caches are not reused.
_CACHE_FORMAT_VERSION = 2


# TSV ---------------------------------------------------------------------------------------------------------------
def _parse_tsv_line(raw: bytes) -> tuple[str, str]:
    """``(caption, url)`` of one TSV line, or ``ValueError`` saying what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 2:
        raise ValueError(f"expected 2 tab-separated columns (caption, url), got {len(fields)}")
    caption, url = fields[0].strip(), fields[1].strip()
    if not caption:
        raise ValueError("empty caption")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"bad URL {url[:100]!r}")
    return caption, url


class _TsvIndex:
    """Byte offsets of a TSV's data rows (8 bytes a row), so one row, or a block of rows, is read by seeking."""

    def __init__(self, path: str):
        self.path = path
        self.header = False
        offsets = array("q")
        pos = 0
        with open(path, "rb") as f:
            for n, line in enumerate(f):
                if n == 0 and line.rstrip(b"\r\n").strip().lower() == b"caption\turl":
                    self.header = True
                else:
                    offsets.append(pos)
                pos += len(line)
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def line_number(self, row: int) -> int:
        """1-based line of the file that holds data row ``row``."""
        return row + 1 + int(self.header)

    def where(self, row: int) -> str:
        return f"{self.path} line {self.line_number(row)}"

    def raw_row(self, row: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[row])
            return f.readline()

    def raw_rows(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[start])
            for row in range(start, min(stop, len(self))):
                yield row, f.readline()


_TSV_CACHE: dict[tuple[str, int, int], _TsvIndex] = {}


def _tsv_index(path: str) -> _TsvIndex:
    """The (per-process, cached) row index of a TSV; rebuilt when the file's size or modification time changes."""
    st = os.stat(path)
    cache_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if cache_key not in _TSV_CACHE:
        if len(_TSV_CACHE) >= 4:
            _TSV_CACHE.clear()
        _TSV_CACHE[cache_key] = _TsvIndex(path)
    return _TSV_CACHE[cache_key]


def _tsv_fallback(tsv: str, key: str, json_url: str | None) -> tuple[str, str]:
    """``(caption, url)`` of the TSV row a sample key names, or ``ValueError`` saying why there is none."""
    if not (key.isascii() and key.isdigit()):
        raise ValueError(f"key {key!r} is not a TSV row number")
    index = _tsv_index(tsv)
    row = int(key)
    if row >= len(index):
        raise ValueError(f"key {key} is beyond the {len(index):,} rows of {tsv}")
    try:
        caption, url = _parse_tsv_line(index.raw_row(row))
    except ValueError as e:
        raise ValueError(f"{index.where(row)} is malformed: {e}") from None
    if json_url is not None and json_url != url:
        raise ValueError(
            f"{index.where(row)} has URL {url[:80]!r} but the sample's .json has {json_url[:80]!r} "
            "(keys are TSV rows only with img2dataset's default --number_sample_per_shard)"
        )
    return caption, url


# Images ------------------------------------------------------------------------------------------------------------
def _image_ok(source: bytes | str, report: BadDataReport, where: str) -> bool:
    """Decode the image (JPEGs at 1/8 scale: every byte is still read) and count it as bad if PIL cannot."""
    problem = probe_image(source, draft=True)
    if problem is not None:
        report.bad(problem[0], where, problem[1])
    return problem is None


def _count_missing_image(report: BadDataReport, where: str) -> None:
    """A TSV row without an image file (a dead URL): counted, not listed as an offender; raises in strict mode."""
    if report.strict:
        report.bad("missing image", where, "no image file for this row (dead URL?)")
    else:
        report.counts["missing image"] += 1


def _scan_image_dir(root: str) -> dict[int, str]:
    """Map row number -> path relative to ``root`` for every ``<digits>.<image ext>`` file below ``root``."""
    index: dict[int, str] = {}
    duplicates: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort(key=natural_key)
        for name in sorted(filenames):
            stem, dot, ext = name.rpartition(".")
            if not dot or ext.lower() not in IMAGE_EXTENSIONS or not (stem.isascii() and stem.isdigit()):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            row = int(stem)
            if row in index:
                duplicates.append(f"{rel} (row {row} is also {index[row]})")
            else:
                index[row] = rel
    if duplicates:
        logger.warning(
            "%s: %d image files name a row that another file already names; using the first: %s",
            root,
            len(duplicates),
            "; ".join(duplicates[:3]),
        )
    return index


_IMAGE_INDEX_CACHE: dict[str, dict[int, str]] = {}


def _image_index(image_dir: str, *, rescan: bool = False) -> dict[int, str]:
    """The (per-process, cached) row -> file index of ``image_dir``; data-loader workers inherit it on fork."""
    root = os.path.abspath(image_dir)
    if rescan or root not in _IMAGE_INDEX_CACHE:
        _IMAGE_INDEX_CACHE.clear()  # one folder at a time: the index of the full set is large
        _IMAGE_INDEX_CACHE[root] = _scan_image_dir(root)
    return _IMAGE_INDEX_CACHE[root]


# Generators --------------------------------------------------------------------------------------------------------
def _shard_rows(shard: str, tsv: str | None, report: BadDataReport) -> Iterator[dict[str, Any]]:
    for key_path, members in tar_samples(shard, report):
        key = posixpath.basename(key_path)
        where = f"{shard}, key {key}"
        report.seen += 1
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None:
            report.bad("no image member", where, f"members: {', '.join(sorted(members))}")
            continue
        url = url_from_json(members.get("json"))
        caption, problem = caption_from_txt(members.get("txt"))
        if caption is None and tsv is not None:
            try:
                caption, url = _tsv_fallback(tsv, key, url)
            except ValueError as e:
                problem = f"{problem}; {e}"
        if caption is None:
            report.bad("missing caption", where, problem)
            continue
        if url is None and tsv is not None:
            try:
                url = _tsv_fallback(tsv, key, None)[1]
            except ValueError:
                pass  # the URL is informative only; the sample is fine without it
        if not _image_ok(members[image_ext], report, where):
            continue
        yield {"image": {"bytes": members[image_ext], "path": None}, "text": caption, "url": url, "key": key}


def _finish(rows: Iterator[dict[str, Any]], report: BadDataReport, what: str, max_samples: int | None):
    """Yield ``rows`` (at most ``max_samples``) and log the report's summary line when they are exhausted."""
    n = 0
    for row in rows:
        yield row
        n += 1
        if max_samples is not None and n >= max_samples:
            what += f" (stopped at max_samples={max_samples:,})"
            break
    report.log_summary(what)


def _generate_from_shards(shards: Sequence[str], tsv: str | None, split: str, strict: bool, max_samples: int | None):
    """Rows of the given tar shards; ``datasets`` calls it once per shard when streaming, once in all otherwise."""
    report = BadDataReport(strict=strict)
    what = f"Conceptual Captions {split} " + (shards[0] if len(shards) == 1 else f"({len(shards):,} shards)")
    rows = (row for shard in shards for row in _shard_rows(shard, tsv, report))
    yield from _finish(rows, report, what, max_samples)


def _generate_from_image_dir(
    blocks: Sequence[tuple[int, int]], tsv: str, image_dir: str, split: str, strict: bool, max_samples: int | None
):
    """Rows of the TSV row ranges ``blocks`` matched to the images of ``image_dir``."""
    report = BadDataReport(strict=strict)
    index, images = _tsv_index(tsv), _image_index(image_dir)
    span = f"rows {blocks[0][0]:,}-{blocks[-1][1] - 1:,}" if blocks else "no rows"
    what = f"Conceptual Captions {split} {image_dir} ({span})"

    def rows() -> Iterator[dict[str, Any]]:
        for start, stop in blocks:
            for row, raw in index.raw_rows(start, stop):
                report.seen += 1
                where = index.where(row)
                try:
                    caption, url = _parse_tsv_line(raw)
                except ValueError as e:
                    report.bad("malformed TSV row", where, str(e))
                    continue
                rel = images.get(row)
                if rel is None:
                    _count_missing_image(report, f"{where} (row {row})")
                    continue
                path = os.path.join(image_dir, rel)
                if _image_ok(path, report, f"{path} ({where})"):
                    yield {"image": {"path": path, "bytes": None}, "text": caption, "url": url, "key": f"{row:09d}"}

    yield from _finish(rows(), report, what, max_samples)


# Public API --------------------------------------------------------------------------------------------------------
def _features() -> datasets.Features:
    """The columns of every Conceptual Captions dataset built here."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features({"image": datasets.Image(mode="RGB"), "text": string, "url": string, "key": string})


def _resolve_tsv(tsv: str | os.PathLike, split: str) -> str:
    path = Path(tsv).expanduser()
    if path.is_dir():
        path = path / SPLIT_TSV[split]
        if not path.is_file():
            raise FileNotFoundError(
                f"tsv={os.fspath(tsv)!r}: no {SPLIT_TSV[split]} in this directory (split={split!r})"
            )
    elif not path.is_file():
        raise FileNotFoundError(f"tsv: no such file {os.fspath(tsv)!r}")
    return str(path)


_SIGNATURE_BYTES = 1 << 16  # hashed from each end of a file: catches an in-place rewrite that kept size and time


def _file_signature(path: str) -> list[Any]:
    """Path, size, modification time and a SHA-256 of the first and last 64 KiB: what makes a shard or TSV "the same
    file" for the Arrow cache (and so for the teacher-embedding cache keyed by its fingerprint)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_SIGNATURE_BYTES))
        if st.st_size > 2 * _SIGNATURE_BYTES:
            f.seek(-_SIGNATURE_BYTES, os.SEEK_END)
        h.update(f.read(_SIGNATURE_BYTES))
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, h.hexdigest()]


def _fingerprint(**parts: Any) -> str:
    blob = json.dumps({"version": _CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return "cc3m-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_conceptual_captions(
    tsv: str | os.PathLike | None = None,
    *,
    shards: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    image_dir: str | os.PathLike | None = None,
    split: str = "train",
    streaming: bool = False,
    strict: bool = False,
    max_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Conceptual Captions with columns ``image``, ``text``, ``url``, ``key`` from images already on disk.

    Args:
        tsv: the official TSV (``caption<TAB>url``, optional header), or the directory holding it (the file named
            by ``split`` in :data:`SPLIT_TSV` is used). Required with ``image_dir``; optional with ``shards``,
            where it only fills in captions of samples whose ``.txt`` member is missing (see the module docstring).
        shards: img2dataset webdataset tars: a directory, a glob, a brace pattern (``cc3m/{00000..00331}.tar``),
            one path, or a list of these.
        image_dir: a folder of images named by TSV row (``12.jpg``, ``00000/000000012.jpg``).
        split: ``"train"`` or ``"validation"``; names the dataset split and picks the file when ``tsv`` is a folder.
        streaming: return an ``IterableDataset`` read on the fly (one ``datasets`` shard per tar) instead of a
            map-style ``Dataset`` written once to an Arrow cache.
        strict: raise :class:`BadDataError` on the first bad image, sample, shard or TSV row (and on the first TSV
            row without an image) instead of skipping and counting it.
        max_samples: keep only the first ``max_samples`` good samples (reading stops there when map-style).
        cache_dir: where the map-style Arrow cache is written (default: the ``datasets`` cache).

    Raises:
        FileNotFoundError: the TSV, a shard, or ``image_dir`` does not exist, or no shard matches.
        ValueError: a bad combination or value of arguments.
        BadDataError: in strict mode, the first bad item, named by shard and key or by TSV line.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if split not in SPLIT_TSV:
        raise ValueError(f"split={split!r}: Conceptual Captions has the splits {', '.join(map(repr, SPLIT_TSV))}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples={max_samples!r}: expected a positive integer or None")
    if shards is not None and image_dir is not None:
        raise ValueError("pass either shards= (webdataset tars) or image_dir= (a folder of images), not both")
    if shards is None and image_dir is None:
        raise ValueError(
            "no images given: the TSV holds only captions and URLs; pass shards= (img2dataset webdataset tars) or "
            "image_dir= (images named by TSV row). See 'Getting the images' in mmkd.data.conceptual_captions."
        )
    if image_dir is not None and tsv is None:
        raise ValueError("image_dir= needs tsv=: the captions of an image folder come from the TSV rows")

    tsv_path = _resolve_tsv(tsv, split) if tsv is not None else None
    feats = _features()

    if shards is not None:
        shard_paths = resolve_shards(shards)
        logger.info(
            "Conceptual Captions %s: %d shard(s), %s ... %s", split, len(shard_paths), shard_paths[0], shard_paths[-1]
        )
        generator = _generate_from_shards
        common = {"tsv": tsv_path, "split": split, "strict": strict}
        sources_key, sources = "shards", shard_paths
        signature = {"shards": [_file_signature(p) for p in shard_paths]}
    else:
        root = str(Path(image_dir).expanduser())
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image_dir: {os.fspath(image_dir)!r} is not a directory")
        images = _image_index(root, rescan=True)
        if not images:
            raise FileNotFoundError(
                f"image_dir={os.fspath(image_dir)!r}: no image files named by TSV row "
                f"(<row>.jpg or zero-padded like 00000/000000012.jpg; extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        n_rows = len(_tsv_index(tsv_path))
        logger.info(
            "Conceptual Captions %s: %s images in %s for %s TSV rows", split, f"{len(images):,}", root, f"{n_rows:,}"
        )
        generator = _generate_from_image_dir
        common = {"tsv": tsv_path, "image_dir": root, "split": split, "strict": strict}
        sources_key = "blocks"
        sources = [(start, min(start + ROWS_PER_BLOCK, n_rows)) for start in range(0, n_rows, ROWS_PER_BLOCK)]
        listing = hashlib.sha256()
        for row in sorted(images):
            listing.update(f"{row}\t{images[row]}\n".encode())
        signature = {"image_dir": root, "images": listing.hexdigest()}

    if streaming:
        # A list in gen_kwargs is what datasets splits across DataLoader workers and nodes (n_shards = its length).
        ds = datasets.IterableDataset.from_generator(
            generator, features=feats, gen_kwargs={sources_key: sources, **common, "max_samples": None},
            split=datasets.Split(split)
        )
        return ds.take(max_samples) if max_samples is not None else ds

    # A tuple is not split: one generator call reads everything, so one report and one summary line.
    fingerprint = _fingerprint(
        mode=sources_key, tsv=_file_signature(tsv_path) if tsv_path else None, split=split, strict=strict,
        max_samples=max_samples, **signature
    )
    try:
        return datasets.Dataset.from_generator(
            generator,
            features=feats,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            gen_kwargs={sources_key: tuple(sources), **common, "max_samples": max_samples},
            split=datasets.Split(split),
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, BadDataError):
            raise e.__cause__ from None  # strict mode: the error naming the shard/key or line, not datasets' wrapper
        raise
