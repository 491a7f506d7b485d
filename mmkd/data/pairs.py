"""Binary image-text matching pairs: which caption each mismatched row gets, for any captioned dataset and COCO.

The research's construction (:func:`matching_pairs` here, :func:`mmkd.data.build_coco_matching` for COCO):
shuffle the rows with the seed, cut them in half, the first half keeps its own caption (label 1, ``match``), the
second half gets the caption of another row (label 0, ``mismatch``) through :func:`foreign_derangement`, so every
caption and every image appears exactly once and the labels are balanced. A mismatch must never be a caption that
describes its image just as well (it would be a true match labelled 0): for a class-captioned set such as
Fashion-MNIST, a caption of the same class (``group_column``); for COCO, a caption of the same image or with the
same text. :func:`hard_negatives` instead gives each mismatched row the most similar acceptable caption.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mmkd.data.fashion_mnist import fashion_mnist_captions

if TYPE_CHECKING:
    import datasets

LABEL_NAMES = ("mismatch", "match")

# Texts encoded per encode_texts call (the encoder batches further inside); a progress-bar step.
_ENCODE_CHUNK = 8192
# Similarity block for hard negatives: queries x pool entries per matmul (2**25 float32 = 128 MiB).
_SIM_BLOCK_ELEMENTS = 2**25


class NoForeignCaption(ValueError):
    """No swap gives row ``row`` a caption it does not clash with (typically: one group fills over half the rows)."""

    def __init__(self, row: int, n: int):
        super().__init__(f"row {row} of {n}: no swap gives it a caption it does not clash with")
        self.row = row


def foreign_derangement(
    n: int,
    clashes: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rng: np.random.Generator,
    max_rounds: int = 1000,
) -> np.ndarray:
    """A permutation ``p`` of ``range(n)`` such that no row ``i`` clashes with the caption of row ``p[i]``.

    ``clashes(rows, sources)`` is elementwise: may row ``rows[k]`` *not* take the caption of row ``sources[k]``?
    Starting from ``rng.permutation(n)``, up to ``max_rounds`` rounds swap every clashing slot with a random slot
    (cheap and fast when no group dominates; how the published Fashion-MNIST pairs were drawn, so kept for
    their reproducibility). Clashes left after that are repaired one by one, each by a swap with a random slot
    where both ends become valid: such a swap fixes its slot and breaks none, so one pass suffices. A clashing row
    without such a partner raises :class:`NoForeignCaption`; with groups that only happens when one group holds
    over half the rows (the rows outside group ``g`` holding a caption outside ``g`` number at least
    ``n - 2 * c_g + 1``).
    """
    rows = np.arange(n)
    perm = rng.permutation(n)
    for _ in range(max_rounds):
        clash = np.flatnonzero(clashes(rows, perm))
        if clash.size == 0:
            return perm
        others = rng.integers(0, n, size=clash.size)
        for i, j in zip(clash, others, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
    for j in np.flatnonzero(clashes(rows, perm)):
        if not clashes(rows[j : j + 1], perm[j : j + 1])[0]:
            continue  # an earlier swap already fixed it
        partners = np.flatnonzero(~clashes(np.full(n, j), perm) & ~clashes(rows, np.full(n, perm[j])))
        if not len(partners):
            raise NoForeignCaption(int(j), n)
        r = partners[rng.integers(len(partners))]
        perm[j], perm[r] = perm[r], perm[j]
    return perm


def _foreign_derangement(groups: np.ndarray, rng: np.random.Generator, max_tries: int = 1000) -> np.ndarray:
    """A permutation ``p`` of ``range(n)`` with ``groups[p[i]] != groups[i]`` for every ``i``."""
    n = len(groups)
    counts = np.unique(groups, return_counts=True)[1]
    if n and counts.max() * 2 > n:
        raise ValueError(
            f"cannot give every mismatched row a caption of another group: one group holds {counts.max()} of the "
            f"{n} rows to mismatch (more than half)"
        )
    return foreign_derangement(n, lambda a, b: groups[a] == groups[b], rng, max_rounds=max_tries)


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
    A mismatch takes the caption of a row of another ``group_column`` value; without ``group_column`` every row
    is its own group (captions are assumed specific to their image).
    """
    import datasets

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
    pairs = pairs.add_column("label", labels.tolist(), feature=datasets.ClassLabel(names=list(LABEL_NAMES)))
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
    import datasets

    out = {}
    for name, split, limit in (("train", "train", max_train_samples), ("validation", "test", max_eval_samples)):
        captions = fashion_mnist_captions(split, data_dir=data_dir, seed=seed, max_examples=limit)
        out[name] = matching_pairs(captions, seed=seed, group_column="label")
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------- hard negatives


def text_encoder(spec):
    """``None``, an object with ``encode_texts`` as is, or whatever ``load_encoder`` makes of ``spec``."""
    if spec is None or callable(getattr(spec, "encode_texts", None)):
        return spec
    from mmkd.eval import encoders  # heavy (model backends): only for hard negatives

    # Only a model this call loads is moved to the GPU; a live model the caller passed stays where it is.
    device = "cuda" if isinstance(spec, str) and torch.cuda.is_available() else None
    return encoders.load_encoder(spec, device=device)


def _encode_texts(encoder, texts: list[str], label: str) -> torch.Tensor:
    from datasets.utils.logging import tqdm  # honours datasets.disable_progress_bars()

    chunks = []
    for start in tqdm(range(0, len(texts), _ENCODE_CHUNK), desc=f"{label}: encoding captions", unit="chunk"):
        chunk = texts[start : start + _ENCODE_CHUNK]
        emb = torch.as_tensor(encoder.encode_texts(chunk))
        if emb.ndim != 2 or emb.shape[0] != len(chunk):
            raise ValueError(
                f"hard_negatives encoder {type(encoder).__name__}.encode_texts returned shape "
                f"{tuple(emb.shape)} for {len(chunk)} texts; expected ({len(chunk)}, embedding_dim)"
            )
        # Cosine similarity: normalise here too, in case the encoder returns raw embeddings.
        chunks.append(F.normalize(emb.float(), dim=-1))
    return torch.cat(chunks)


def hard_negatives(
    row_image: np.ndarray,
    row_caption: np.ndarray,
    texts: list[str],
    text_key: np.ndarray,
    offsets: np.ndarray,
    encoder,
    label: str,
) -> np.ndarray:
    """For each row, the caption most similar to its own caption ``row_caption`` (cosine of ``encoder``'s text
    embeddings) whose text is not that of a caption of the row's image ``row_image``; the first on ties.

    ``texts`` and ``text_key`` (an id of the normalised text) cover every caption, grouped by image: image ``i``
    owns ``[offsets[i], offsets[i + 1])``. Hard negatives may repeat across rows.
    """
    from datasets.utils.logging import tqdm

    # Identical texts are encoded once: COCO repeats captions, and encoding is the expensive step.
    unique: dict[str, int] = {}
    cap_unique = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), np.int64, len(texts))
    # Each text's first caption (image, then caption order) stands for it: reproducible on ties.
    first_caption = np.unique(cap_unique, return_index=True)[1]
    key_to_unique: dict[int, list[int]] = defaultdict(list)
    for u, key in enumerate(text_key[first_caption].tolist()):
        key_to_unique[key].append(u)

    emb = _encode_texts(encoder, list(unique), label)
    queries = torch.as_tensor(cap_unique[row_caption], device=emb.device)
    block = max(1, _SIM_BLOCK_ELEMENTS // max(1, len(unique)))
    best = np.empty(len(row_image), dtype=np.int64)
    for start in tqdm(range(0, len(row_image), block), desc=f"{label}: hard negatives", unit="block"):
        stop = min(start + block, len(row_image))
        sims = emb[queries[start:stop]] @ emb.T
        # Mask every text that is (the same text as) one of the row image's own captions.
        rows, cols = [], []
        for r, image in enumerate(row_image[start:stop].tolist()):
            for key in set(text_key[offsets[image] : offsets[image + 1]].tolist()):
                for u in key_to_unique[key]:
                    rows.append(r)
                    cols.append(u)
        sims[torch.as_tensor(rows, device=sims.device), torch.as_tensor(cols, device=sims.device)] = -torch.inf
        top = torch.argmax(sims, dim=1)  # the first maximum on ties
        if torch.isinf(sims.gather(1, top[:, None])).any():
            raise ValueError(f"{label}: an image has no caption of another image with a different text")
        best[start:stop] = top.cpu().numpy()
    return first_caption[best]
