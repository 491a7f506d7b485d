"""Skip-and-count handling of bad data, shared by every builder, and the one check that an image decodes.

A run over millions of web images must not die on image 2,000,001: corrupt, truncated or missing images and
malformed annotation rows are skipped and counted, and a summary names the first few offenders. ``strict=True``
turns the first problem into an error instead (for curated sets where any bad file is a bug).

    report = BadDataReport(strict=False)
    for i, path in enumerate(paths):
        image = report.load_image(path, where=f"row {i}")
        if image is None:
            continue
    report.log_summary("COCO train2017")    # "COCO train2017: skipped 3 of 118,287 items (2 unreadable image, ...)"

Every builder asks :func:`probe_image` whether an image can be read, so a file rejected by one is rejected by all,
for the same reason ("missing image" or "unreadable image").
"""

from __future__ import annotations

import functools
import io
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

logger = logging.getLogger(__name__)

# What opening a path with no file behind it raises.
_NO_FILE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class BadDataError(ValueError):
    """Raised in strict mode for the first bad item; the message names the file or row and the problem."""


def _open_image(source, decode: bool, draft: bool, rgb: bool) -> tuple[Image.Image | None, tuple[str, str] | None]:
    """``(the RGB image if rgb, None)`` for a readable image, else ``(None, (reason, detail))``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            if draft:  # JPEG only (a no-op for other formats): decode at 1/8 scale, still reading every byte
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            if decode:
                img.load()  # a truncated file has a valid header and fails only here
            return (img.convert("RGB") if rgb else None), None
    except _NO_FILE:
        return None, ("missing image", "")
    except Exception as e:  # PIL raises many types on crafted/corrupt files, and none may stop a run
        return None, ("unreadable image", f"{type(e).__name__}: {e}")


def probe_image(source, *, decode: bool = True, draft: bool = False) -> tuple[str, str] | None:
    """``None`` if ``source`` (a path, bytes or a file object) is a readable image, else ``(reason, detail)``.

    ``decode=False`` reads only the header (fast; catches missing, empty, non-image and corrupt-header files but
    not truncated ones); ``draft=True`` decodes JPEGs at 1/8 scale, which still catches truncation.
    """
    return _open_image(source, decode, draft, rgb=False)[1]


def check_images(
    paths: list[str], report: BadDataReport, *, decode: bool, draft: bool = False, num_proc: int | None = None,
    what: str = "data",
) -> list[bool]:
    """Which of ``paths`` :func:`probe_image` accepts, in order, probing on ``num_proc`` threads (Pillow
    releases the GIL while reading and decoding, so threads scale without pickling) with a progress bar. Bad
    files are recorded in ``report`` in path order, so strict mode names the first bad file."""
    from datasets.utils.logging import tqdm  # honours datasets.disable_progress_bars()

    desc = f"{what}: {'decoding' if decode else 'checking'} images"
    ok = []
    pool = ThreadPoolExecutor(max_workers=num_proc) if num_proc and num_proc > 1 else None
    try:
        probe = functools.partial(probe_image, decode=decode, draft=draft)
        results = pool.map(probe, paths) if pool else map(probe, paths)
        for path, problem in tqdm(zip(paths, results, strict=True), total=len(paths), desc=desc, unit="img"):
            if problem is not None:
                report.bad(problem[0], path, problem[1])
            ok.append(problem is None)
    finally:
        if pool is not None:
            # strict mode raised mid-way: don't wait for the remaining (possibly 100k) files to be read
            pool.shutdown(wait=False, cancel_futures=True)
    return ok


@dataclass
class BadDataReport:
    """Counts skipped items by reason and remembers the first ``keep_examples`` offenders."""

    strict: bool = False
    keep_examples: int = 5
    seen: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def bad(self, reason: str, where: str, detail: str = "") -> None:
        """Record one bad item (or raise in strict mode). ``reason`` is a short category, ``where`` a file/row."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadDataError(message)
        self.counts[reason] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append(message)

    def load_image(self, source, where: str | None = None) -> Image.Image | None:
        """Open and fully decode an image (path, bytes or file object) as RGB; ``None`` (counted) if it can't be
        read. Decoding now makes a truncated file fail here, not later in a data-loader worker."""
        self.seen += 1
        image, problem = _open_image(source, decode=True, draft=False, rgb=True)
        if problem is not None:
            where = where or ("image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source))
            self.bad(problem[0], where, problem[1])
        return image

    def summary(self, what: str = "data") -> str:
        if not self.skipped:
            return f"{what}: no bad items in {self.seen:,}"
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.counts.most_common())
        first = "; ".join(self.examples)
        return f"{what}: skipped {self.skipped:,} of {self.seen:,} items ({reasons}); first: {first}"

    def log_summary(self, what: str = "data") -> str:
        line = self.summary(what)
        (logger.warning if self.skipped else logger.info)(line)
        return line


def _caption_problem(text) -> str | None:
    if not isinstance(text, str):
        return f"caption is a {type(text).__name__}, not text"
    return None if text.strip() else "empty caption"


def _row_problem(image, text) -> tuple[str, str] | None:
    """Why an (image, caption) row cannot be trained on, or ``None``. ``image``: the ``Image`` feature's undecoded
    ``{"bytes", "path"}`` (or a PIL image)."""
    problem = _caption_problem(text)
    if problem:
        return "bad caption", problem
    if image is None:
        return "missing image", "no image in the row"
    if isinstance(image, dict):
        source = image.get("bytes") if image.get("bytes") is not None else image.get("path")
        if source is None:
            return "missing image", "no image in the row"
        return probe_image(source, decode=True, draft=True)
    try:  # a PIL image from a stream: opened lazily, so decode it now
        image.load()
    except Exception as e:  # PIL raises many types on corrupt files
        return "unreadable image", f"{type(e).__name__}: {e}"
    return None


def drop_bad_rows(dataset, image_column: str, text_column: str, *, strict: bool = False, what: str = "data"):
    """``dataset`` without the rows that cannot be trained on: a caption that is not a non-empty string, an image
    that is missing or does not decode (JPEGs at 1/8 scale, which reads every byte). Map-style sets are checked up
    front and the summary line is logged with exact counts; a stream skips and counts as it goes (the first
    offenders are logged). ``strict=True`` raises :class:`BadDataError` on the first bad row instead."""
    import datasets

    report = BadDataReport(strict=strict)
    decoded = dataset.features.get(image_column) if dataset.features else None
    undecoded = datasets.Image(decode=False) if isinstance(decoded, datasets.Image) else None
    if isinstance(dataset, datasets.IterableDataset):
        def keep(example) -> bool:
            report.seen += 1
            problem = _row_problem(example[image_column], example[text_column])
            if problem is not None:
                before = len(report.examples)
                report.bad(problem[0], f"{what} example {report.seen - 1}", problem[1])
                if len(report.examples) > before:
                    logger.warning("skipped %s", report.examples[-1])
            return problem is None

        if undecoded is None:
            return dataset.filter(keep)
        # the Image feature would decode (and raise on a corrupt file) before the filter sees the row: check the
        # undecoded {"bytes", "path"}, then decode what was kept
        kept = dataset.cast_column(image_column, undecoded).filter(keep)
        return kept.map(lambda example: {image_column: decoded.decode_example(example[image_column])},
                        features=dataset.features)

    def keep_batch(batch, indices) -> list[bool]:
        flags = []
        for image, text, index in zip(batch[image_column], batch[text_column], indices, strict=True):
            report.seen += 1
            problem = _row_problem(image, text)
            if problem is not None:
                path = image.get("path") if isinstance(image, dict) else None
                report.bad(problem[0], f"{what} row {index}" + (f" ({path})" if path else ""), problem[1])
            flags.append(problem is None)
        return flags

    raw = dataset.cast_column(image_column, undecoded) if undecoded else dataset
    # keep_in_memory / no cache file: the check runs every time, so the counts in the summary are this run's
    kept = raw.filter(keep_batch, batched=True, with_indices=True, keep_in_memory=True, load_from_cache_file=False,
                      desc=f"{what}: checking rows")
    report.log_summary(what)
    if report.seen and report.skipped == report.seen:  # not bad data: the wrong columns
        from mmkd.checks import ConfigError

        raise ConfigError(f"image_column={image_column}, text_column={text_column}: every one of the {report.seen:,} "
                          f"rows of {what} was refused (first: {report.examples[0]}); are these the image and "
                          "caption columns?")
    if not report.skipped:  # nothing dropped: the dataset as it was, without an indices mapping to flatten later
        return dataset
    return kept.cast_column(image_column, decoded) if undecoded else kept
