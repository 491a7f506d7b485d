"""COCO captions as a binary image-text matching set: is this caption about this image (``match``) or not?

The research's construction (Fysikoudi, *Knowledge distillation experiments*, section 2), from the official
files, per split: keep one caption per image (chosen with the seed); shuffle the images and cut them in half;
the first half keeps its own caption (label 1, ``match``), the second half gets, through a random derangement
of its own captions (:func:`mmkd.data.pairs.foreign_derangement`), the caption of a *different* image (label
0, ``mismatch``). Every kept caption and every image is in exactly one row, so neither how often a text nor
how often an image occurs gives the label away. A mismatch is never a caption of the image itself, nor one
whose text is that of one of the image's own (COCO has duplicates such as "A man riding a wave on top of a
surfboard."; compared case-, whitespace- and final-period-insensitively): a true match labelled 0.

``captions="all"``: one candidate row per (image, own caption); the rows are cut in half (``match`` gets
``N // 2``, ``mismatch`` the other ``N - N // 2``) and the mismatched rows' captions permuted the same way.
Every caption is in exactly one row, an image with ``c`` captions in ``c`` rows (possibly of both labels), and
the labels are balanced to within one row whatever the captions per image.

``hard_negatives=`` (the research's suggested extension) gives each mismatched row the caption most similar to
its own (cosine of a CLIP text tower) among all captions of all *other* usable images of the split, not only
the kept ones (:func:`mmkd.data.pairs.hard_negatives`). Kept captions, which rows match and the row order are
those of the random build for that seed; only the mismatched texts change, and they may repeat.

Bad data (:mod:`mmkd.data.baddata`) is skipped and counted, or raised with ``strict=True``: image entries
without ``id``/``file_name``, annotation rows lacking ``id``/``image_id``/``caption`` or naming an image
absent from ``images``, images left without captions, and missing or unreadable image files. The files are
checked *before* the pairs are built, so a bad image never takes a caption with it into another row, and every
row the builder returns decodes: by default each JPEG is decoded at 1/8 scale (every byte of its scan is read, so
truncated files are caught, at a fraction of a full decode's cost) and other formats fully; ``verify_images=True``
decodes every image at full size. A progress bar shows the check, on ``num_proc`` threads (Pillow releases the
GIL while decoding, so threads scale without pickling).

The ``image`` column stores the absolute file path (a ``datasets.Image`` feature): the table stays small and
images are decoded only when read.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmkd.data.baddata import BadDataReport, check_images
from mmkd.data.pairs import LABEL_NAMES, NoForeignCaption, foreign_derangement, hard_negatives, text_encoder

if TYPE_CHECKING:
    import datasets

__all__ = ["LABEL_NAMES", "build_coco_matching"]

logger = logging.getLogger(__name__)

YEARS = (2014, 2017)
CAPTION_MODES = ("one", "all")
# Standard-layout split name -> the prefix COCO uses for its folders and annotation files.
_SPLIT_PREFIX = {"train": "train", "validation": "val"}


@dataclass(frozen=True)
class _Source:
    """Where one split comes from."""

    split: str
    annotations: Path
    images: Path

    @property
    def label(self) -> str:
        return f"COCO {self.split} ({self.annotations.name})"


@dataclass
class _SplitCaptions:
    """One split's usable images and all their captions, images in id order, captions grouped by image.

    ``cap_key`` is an integer id of the caption's normalised text: two captions with the same key say the same
    thing, so a caption of another image with a key of image ``a`` must never be ``a``'s mismatch.
    """

    image_ids: np.ndarray  # (n,) COCO image ids
    paths: list[str]  # (n,) absolute image paths
    offsets: np.ndarray  # (n + 1,) captions of image i are cap_*[offsets[i]:offsets[i + 1]]
    cap_ids: np.ndarray  # (C,) COCO annotation ids
    cap_texts: list[str]  # (C,)
    cap_image: np.ndarray  # (C,) index of the image the caption belongs to
    cap_key: np.ndarray  # (C,) normalised-text id

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def build_coco_matching(
    root: str | Path | None = None,
    *,
    annotations: Mapping[str, str | Path] | None = None,
    images: Mapping[str, str | Path] | None = None,
    splits: Sequence[str] | None = None,
    year: int = 2017,
    seed: int = 0,
    captions: str = "one",
    hard_negatives: Any = None,
    strict: bool = False,
    max_images: int | None = None,
    verify_images: bool = False,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Build the binary image-text matching set from COCO captions (see the module docstring for the method).

    Args:
        root: a COCO folder in the standard layout: ``annotations/captions_{train,val}{year}.json`` and the
            image folders ``train{year}/``, ``val{year}/``. Split ``"train"`` reads ``train{year}``,
            ``"validation"`` reads ``val{year}``.
        annotations, images: explicit captions JSON / image folder per split (``{"train": path, ...}``);
            override ``root`` for those splits.
        splits: the splits to build, in order. Default: the keys of ``annotations`` when it is given, else
            ``("train", "validation")``.
        year: 2014 or 2017, the release whose standard layout ``root`` has.
        seed: makes the caption choice, the subset, the halves, the derangement and the row order
            reproducible. Each split draws from its own stream (seed and split name), so building one split
            alone gives the same rows as building it with others.
        captions: ``"one"`` (the research: one caption per image, one row per image) or ``"all"`` (one row per
            caption; see the module docstring for how the labels stay balanced).
        hard_negatives: a text encoder for hard negatives: any object with ``encode_texts(list[str])``
            returning ``(N, E)`` embeddings (an :class:`mmkd.eval.encoders.CLIPEncoder`, a test double), or
            anything :func:`mmkd.eval.encoders.load_encoder` accepts (a model directory / hub id / open_clip
            name - loaded onto the GPU when there is one -, an mmkd ``CLIPTeacher``). ``None``: random
            mismatches.
        strict: raise :class:`~mmkd.data.baddata.BadDataError` on the first bad image or row, not skip it.
        max_images: for quick runs: a seeded random subset of at most this many images per split, taken before
            the image files are checked (so bad files in the subset leave fewer).
        verify_images: decode every image at full size up front (default: JPEGs at 1/8 scale, which also catches
            truncated files).
        num_proc: threads for checking the image files (default: the calling thread only).

    Returns:
        A ``DatasetDict`` with columns ``image`` (``datasets.Image``, stored as the path), ``text``, ``label``
        (``ClassLabel(names=["mismatch", "match"])``), ``image_id``, ``caption_id`` (the COCO annotation id of
        the text) and ``caption_image_id`` (the image that caption belongs to), rows in a seeded random order.
        Each split's ``info.description`` records how it was built and what was skipped.

    Raises:
        FileNotFoundError: an annotation file or image folder does not exist.
        ValueError: bad arguments, an annotation file that is not valid COCO captions JSON, or a split with
            too few usable images to build mismatches.
        mmkd.data.baddata.BadDataError: in strict mode, the first bad item.
    """
    import datasets

    _check_arguments(year, seed, captions, max_images, num_proc)
    sources = _resolve_sources(root, annotations, images, splits, year)
    # Load the encoder before reading anything big: a bad model spec must fail in seconds, not after the scan.
    encoder = text_encoder(hard_negatives)

    features = datasets.Features(
        {
            "image": datasets.Value("string"),  # cast to Image() below: stored as the path, decoded on access
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
            "image_id": datasets.Value("int64"),
            "caption_id": datasets.Value("int64"),
            "caption_image_id": datasets.Value("int64"),
        }
    )
    out = {}
    for source in sources:
        # Independent streams per purpose: a hard-negative build consumes the derangement stream differently
        # from a random one, and must still pick the same captions, halves and row order.
        subset_rng, pairs_rng, derange_rng, order_rng = (
            np.random.default_rng(s)
            for s in np.random.SeedSequence([seed, zlib.crc32(source.split.encode())]).spawn(4)
        )
        report = BadDataReport(strict=strict)
        split_captions = _read_split(source, report, max_images, subset_rng, verify_images, num_proc)
        rows = _build_rows(
            source, split_captions, captions, encoder, pairs_rng, derange_rng, order_rng, report
        )
        summary = report.log_summary(source.label)
        n_match = int(rows["label"].sum())
        negatives = f"hard ({getattr(encoder, 'name', type(encoder).__name__)})" if encoder else "random"
        description = (
            f"{source.label} image-text matching: {len(rows['label']):,} rows ({n_match:,} match, "
            f"{len(rows['label']) - n_match:,} mismatch) from {split_captions.num_images:,} images; "
            f"captions={captions!r}, negatives={negatives}, seed={seed}. {summary}"
        )
        logger.info(description)
        img, cap = rows["image"], rows["caption"]
        table = {
            "image": [split_captions.paths[i] for i in img],
            "text": [split_captions.cap_texts[c] for c in cap],
            "label": rows["label"].tolist(),
            "image_id": split_captions.image_ids[img].tolist(),
            "caption_id": split_captions.cap_ids[cap].tolist(),
            "caption_image_id": split_captions.image_ids[split_captions.cap_image[cap]].tolist(),
        }
        info = datasets.DatasetInfo(description=description, features=features)
        out[source.split] = datasets.Dataset.from_dict(table, info=info, split=source.split).cast_column(
            "image", datasets.Image()
        )
    return datasets.DatasetDict(out)


# ------------------------------------------------------------------------------------------- arguments


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(year, seed, captions, max_images, num_proc) -> None:
    if year not in YEARS:
        raise ValueError(f"year must be one of {YEARS} (the COCO captions releases), got {year!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    if max_images is not None and (not _is_int(max_images) or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}")
    if num_proc is not None and (not _is_int(num_proc) or num_proc < 1):
        raise ValueError(f"num_proc must be a positive integer or None, got {num_proc!r}")


def _resolve_sources(root, annotations, images, splits, year) -> list[_Source]:
    """Each split's annotation file and image folder, all checked to exist before anything is read."""
    annotations = dict(annotations or {})
    images = dict(images or {})
    if splits is None:
        splits = tuple(annotations) if annotations else tuple(_SPLIT_PREFIX)
    elif isinstance(splits, str):
        splits = (splits,)
    splits = tuple(splits)
    if not splits:
        raise ValueError("splits is empty: name at least one split")
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits has duplicates: {splits}")
    for name, given in (("annotations", annotations), ("images", images)):
        # A key that is not built is almost always a typo ("val" for "validation"): say so, don't ignore it.
        unknown = [k for k in given if k not in splits]
        if unknown:
            raise ValueError(f"{name} has split(s) {unknown} that are not among splits={list(splits)}")
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"COCO root folder not found: {root}")

    sources = []
    for split in splits:
        ann, img = annotations.get(split), images.get(split)
        if ann is None or img is None:
            if root is None:
                missing = "annotations" if ann is None else "images"
                raise ValueError(
                    f"no {missing} for split {split!r}: "
                    f"pass root= (a COCO folder) or {missing}={{{split!r}: ...}}"
                )
            if split not in _SPLIT_PREFIX:
                raise ValueError(
                    f"split {split!r} has no standard COCO {year} layout (known: {list(_SPLIT_PREFIX)}); "
                    f"pass its files as annotations={{{split!r}: ...}}, images={{{split!r}: ...}}"
                )
            prefix = f"{_SPLIT_PREFIX[split]}{year}"
            ann = ann if ann is not None else root / "annotations" / f"captions_{prefix}.json"
            img = img if img is not None else root / prefix
        ann, img = Path(ann), Path(img)
        if not ann.is_file():
            raise FileNotFoundError(f"COCO captions annotation file for split {split!r} not found: {ann}")
        if not img.is_dir():
            raise FileNotFoundError(f"COCO image folder for split {split!r} not found: {img}")
        sources.append(_Source(split, ann, img.resolve()))
    return sources


# --------------------------------------------------------------------------------------------- reading


def _load_annotation_file(path: Path) -> tuple[list, list]:
    """The ``images`` and ``annotations`` lists of a COCO captions JSON; else ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO captions JSON object, got a JSON {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}, not a list"
            raise ValueError(f"{path}: the {key!r} field is {found}; is this a COCO captions file?")
    anns = data["annotations"]
    if anns and not any(isinstance(a, dict) and "caption" in a for a in anns):
        # e.g. instances_*.json: every row would be "malformed" - a wrong file, not bad rows.
        raise ValueError(f"{path}: no annotation has a 'caption' field; is this a COCO *captions* file?")
    return data["images"], anns


def _text_key(text: str) -> str:
    """What makes two captions 'the same text': case, runs of whitespace and a final period don't count."""
    return " ".join(text.casefold().split()).rstrip(" .")


def _read_split(
    source: _Source,
    report: BadDataReport,
    max_images: int | None,
    rng: np.random.Generator,
    verify: bool,
    num_proc: int | None,
) -> _SplitCaptions:
    raw_images, raw_anns = _load_annotation_file(source.annotations)
    name = source.annotations.name

    files: dict[int, str] = {}
    for i, entry in enumerate(raw_images):
        report.seen += 1
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        where = f"{name} images[{i}]"
        if not _is_int(image_id) or not isinstance(file_name, str) or not _is_plain_relative(file_name):
            report.bad("malformed image entry", where, f"id={image_id!r}, file_name={file_name!r}")
        elif image_id in files:
            report.bad("duplicate image id", where, f"id {image_id} is listed twice")
        else:
            files[image_id] = file_name

    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    ann_ids: set[int] = set()
    for i, ann in enumerate(raw_anns):
        report.seen += 1
        ann = ann if isinstance(ann, dict) else {}
        ann_id, image_id, caption = ann.get("id"), ann.get("image_id"), ann.get("caption")
        where = f"{name} annotations[{i}]" + (f" (annotation id {ann_id})" if _is_int(ann_id) else "")
        invalid = [
            field
            for field, ok in (
                ("id", _is_int(ann_id)),
                ("image_id", _is_int(image_id)),
                ("caption", isinstance(caption, str) and bool(caption.strip())),
            )
            if not ok
        ]
        if invalid:
            report.bad("malformed annotation", where, f"missing or invalid {', '.join(invalid)}")
        elif image_id not in files:
            report.bad("unknown image id", where, f"image_id {image_id} is not in 'images'")
        elif ann_id in ann_ids:
            report.bad("duplicate annotation id", where, f"id {ann_id} is used twice")
        else:
            ann_ids.add(ann_id)
            # COCO captions carry stray leading/trailing spaces and newlines; they are noise, not content.
            by_image[image_id].append((ann_id, caption.strip()))

    ids = sorted(files)
    for image_id in ids:
        if image_id not in by_image:
            report.bad("image without captions", f"{name} image id {image_id}", files[image_id])
    ids = [i for i in ids if i in by_image]
    if max_images is not None and max_images < len(ids):
        pick = np.sort(rng.choice(len(ids), size=max_images, replace=False))
        ids = [ids[i] for i in pick]

    paths = [str(source.images / files[i]) for i in ids]
    ok = check_images(paths, report, decode=True, draft=not verify, num_proc=num_proc, what=source.label)
    ids = [i for i, good in zip(ids, ok, strict=True) if good]
    paths = [p for p, good in zip(paths, ok, strict=True) if good]

    cap_ids, cap_texts, cap_image, counts = [], [], [], []
    for index, image_id in enumerate(ids):
        # Annotation-id order: the seeded caption choice must not depend on the order of rows in the file.
        caps = sorted(by_image[image_id])
        counts.append(len(caps))
        for ann_id, text in caps:
            cap_ids.append(ann_id)
            cap_texts.append(text)
            cap_image.append(index)
    keys: dict[str, int] = {}
    cap_key = np.fromiter(
        (keys.setdefault(_text_key(t), len(keys)) for t in cap_texts), np.int64, len(cap_texts)
    )
    return _SplitCaptions(
        image_ids=np.asarray(ids, dtype=np.int64),
        paths=paths,
        offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        cap_ids=np.asarray(cap_ids, dtype=np.int64),
        cap_texts=cap_texts,
        cap_image=np.asarray(cap_image, dtype=np.int64),
        cap_key=cap_key,
    )


def _is_plain_relative(file_name: str) -> bool:
    """COCO file names are bare names inside the split folder; anything climbing out of it is malformed."""
    p = Path(file_name)
    return bool(file_name) and not p.is_absolute() and ".." not in p.parts


# --------------------------------------------------------------------------------------------- pairing


def _build_rows(
    source: _Source,
    data: _SplitCaptions,
    mode: str,
    encoder,
    pairs_rng: np.random.Generator,
    derange_rng: np.random.Generator,
    order_rng: np.random.Generator,
    report: BadDataReport,
) -> dict[str, np.ndarray]:
    """Rows as arrays: ``image`` (image index), ``caption`` (caption index), ``label``; in final order."""
    n = data.num_images
    if n < 3:
        # Two images make one match and one mismatch whose only foreign caption is the matched image's: a
        # caption would occur twice, once per label. Three is the least that keeps every caption to one row.
        raise ValueError(
            f"{source.label}: {n} usable image(s); at least 3 are needed to build matched and mismatched "
            f"pairs. {report.summary(source.label)}"
        )
    if mode == "one":
        counts = np.diff(data.offsets)
        row_image = np.arange(n)
        row_caption = data.offsets[:-1] + pairs_rng.integers(0, counts)
    else:
        row_image = data.cap_image.copy()
        row_caption = np.arange(len(data.cap_ids))

    order = pairs_rng.permutation(len(row_image))
    n_match = len(order) // 2
    mismatched = order[n_match:]
    labels = np.ones(len(order), dtype=np.int64)
    labels[mismatched] = 0
    new_caption = row_caption.copy()
    if encoder is None:
        new_caption[mismatched] = _foreign_permutation(
            row_image[mismatched], row_caption[mismatched], data, derange_rng, source
        )
    else:
        new_caption[mismatched] = hard_negatives(
            row_image[mismatched], row_caption[mismatched], data.cap_texts, data.cap_key, data.offsets,
            encoder, source.label
        )
    final = order_rng.permutation(len(order))
    return {"image": row_image[final], "caption": new_caption[final], "label": labels[final]}


def _foreign_permutation(
    row_image: np.ndarray, row_caption: np.ndarray, data: _SplitCaptions, rng: np.random.Generator, source
) -> np.ndarray:
    """Permute ``row_caption`` so that no row gets a caption (or the text of a caption) of its own image.

    Straight to :func:`~mmkd.data.pairs.foreign_derangement`'s targeted repair (``max_rounds=0``): one pass,
    and the rows COCO builds have always had for a seed. When no image owns more than half the rows, and no
    texts repeat across images, a valid partner always exists: the rows blocked for row ``j`` (those of its
    image or holding its image's captions) number at most ``2c - 1 < n``.
    """
    # Sorted codes image * K + key of every (image, own caption text) pair.
    num_keys = int(data.cap_key.max()) + 1
    forbidden = np.unique(data.cap_image * num_keys + data.cap_key)

    def clashes(rows: np.ndarray, sources: np.ndarray) -> np.ndarray:
        return np.isin(row_image[rows] * num_keys + data.cap_key[row_caption[sources]], forbidden)

    try:
        return row_caption[foreign_derangement(len(row_caption), clashes, rng, max_rounds=0)]
    except NoForeignCaption as e:
        raise ValueError(
            f"{source.label}: cannot give every mismatched row a caption of another image: one image (id "
            f"{data.image_ids[row_image[e.row]]}) or its caption texts fill over half of the "
            f"{len(row_caption)} mismatched rows; use more images"
        ) from None
