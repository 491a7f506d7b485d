"""Binary image-text matching pairs from any captioned dataset (the research's construction, beyond COCO).

Same recipe as :func:`mmkd.data.build_coco_matching`: shuffle the rows with the seed, cut them in half, the first
half keeps its own caption (label 1, ``match``), the second half gets the caption of another row (label 0,
``mismatch``) through a derangement, so every caption and every image appears exactly once and the labels are
balanced. ``group_column`` names what makes two captions interchangeable: a mismatch always takes the caption of a
row of a *different* group. For a class-captioned set such as Fashion-MNIST that is the class label, since the
caption of another sneaker image describes this sneaker just as well and would be a true match labelled 0.
"""

from __future__ import annotations

import datasets
import numpy as np

from mmkd.data.fashion_mnist import fashion_mnist_captions

LABELS = datasets.ClassLabel(names=["mismatch", "match"])


def _foreign_derangement(groups: np.ndarray, rng: np.random.Generator, max_tries: int = 1000) -> np.ndarray:
    """A permutation ``p`` of ``range(n)`` with ``groups[p[i]] != groups[i]`` for every ``i``."""
    n = len(groups)
    counts = np.unique(groups, return_counts=True)[1]
    if n and counts.max() * 2 > n:
        raise ValueError(
            f"cannot give every mismatched row a caption of another group: one group holds {counts.max()} of the "
            f"{n} rows to mismatch (more than half)"
        )
    perm = rng.permutation(n)
    for _ in range(max_tries):
        clash = np.flatnonzero(groups[perm] == groups)
        if clash.size == 0:
            return perm
        # Swap every clashing slot with a random slot; converges fast when no group dominates.
        others = rng.integers(0, n, size=clash.size)
        for i, j in zip(clash, others, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
    raise RuntimeError("no group-respecting derangement found; the groups are too unbalanced")


def matching_pairs(
    dataset: datasets.Dataset,
    seed: int = 0,
    image_column: str = "image",
    text_column: str = "text",
    group_column: str | None = None,
) -> datasets.Dataset:
    """Balanced matched / mismatched image-caption pairs from ``dataset`` (one row per image).

    Returns the columns ``image``, ``text``, ``label`` (``ClassLabel``: 0 ``mismatch``, 1 ``match``),
    ``source_index`` (the row of the image) and ``caption_index`` (the row the caption comes from), shuffled.
    Without ``group_column`` every row is its own group (captions are assumed specific to their image).
    """
    for column in (image_column, text_column, group_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"column {column!r} not in the dataset (columns: {dataset.column_names})")
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 rows to build matching pairs, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    matched, mismatched = order[: n // 2], order[n // 2 :]
    groups = np.asarray(dataset[group_column]) if group_column else np.arange(n)
    caption_of = np.arange(n)
    caption_of[mismatched] = mismatched[_foreign_derangement(groups[mismatched], rng)]
    texts = dataset[text_column]
    rows = np.concatenate([matched, mismatched])
    labels = np.concatenate([np.ones(len(matched), dtype=np.int64), np.zeros(len(mismatched), dtype=np.int64)])
    shuffle = rng.permutation(n)
    rows, labels = rows[shuffle], labels[shuffle]
    pairs = dataset.select_columns([image_column]).select(rows.tolist())
    if image_column != "image":
        pairs = pairs.rename_column(image_column, "image")
    pairs = pairs.add_column("text", [texts[int(caption_of[r])] for r in rows])
    pairs = pairs.add_column("label", labels.tolist(), feature=LABELS)
    pairs = pairs.add_column("source_index", rows.tolist())
    return pairs.add_column("caption_index", caption_of[rows].tolist())


def fashion_mnist_matching(
    data_dir: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> datasets.DatasetDict:
    """Matching pairs from captioned Fashion-MNIST: ``train`` from the training split, ``validation`` from the
    held-out test split. A mismatch always gets a caption of another class."""
    out = {}
    for name, split, limit in (("train", "train", max_train_samples), ("validation", "test", max_eval_samples)):
        captions = fashion_mnist_captions(split, data_dir=data_dir, seed=seed, max_examples=limit)
        out[name] = matching_pairs(captions, seed=seed, group_column="label")
    return datasets.DatasetDict(out)
