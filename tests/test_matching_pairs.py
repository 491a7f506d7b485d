"""mmkd.data.pairs: balanced matching pairs from any captioned dataset (Fashion-MNIST offline)."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from mmkd.data.pairs import (
    NoForeignCaption,
    _foreign_derangement,
    fashion_mnist_matching,
    foreign_derangement,
    matching_pairs,
)
from tests.test_fashion_mnist import write_split


def captioned(n: int, classes: int = 4) -> datasets.Dataset:
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(n)]
    labels = [i % classes for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": images, "text": [f"caption {i} of class {c}" for i, c in enumerate(labels)], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.Value("int64")}),
    )


@pytest.mark.parametrize("n", [21, 40])
def test_pairs_are_balanced_use_everything_once_and_never_mismatch_within_a_group(n):
    ds = captioned(n)
    pairs = matching_pairs(ds, seed=3, group_column="label")
    labels = pairs["label"]
    assert Counter(labels) == {1: n // 2, 0: n - n // 2}
    assert sorted(pairs["source_index"]) == list(range(n))  # every image once
    assert sorted(pairs["caption_index"]) == list(range(n))  # every caption once
    classes = ds["label"]
    for src, cap, label, text in zip(pairs["source_index"], pairs["caption_index"], labels, pairs["text"],
                                     strict=True):
        assert text == ds[cap]["text"]
        if label == 1:
            assert src == cap
        else:
            assert classes[src] != classes[cap]
    # The image column really is the source row's image.
    first = pairs[0]
    assert first["image"].getpixel((0, 0))[0] == first["source_index"]
    assert pairs.features["label"].names == ["mismatch", "match"]


def test_deterministic_per_seed_and_different_across_seeds():
    ds = captioned(30)
    a, b, c = (matching_pairs(ds, seed=s, group_column="label") for s in (0, 0, 1))
    assert a["source_index"] == b["source_index"] and a["caption_index"] == b["caption_index"]
    assert a["source_index"] != c["source_index"]


def test_without_groups_only_self_mismatch_is_excluded():
    pairs = matching_pairs(captioned(11), seed=0)
    assert all((s == c) == (lab == 1) for s, c, lab in
               zip(pairs["source_index"], pairs["caption_index"], pairs["label"], strict=True))


def test_bad_input():
    with pytest.raises(ValueError, match="'caption'"):
        matching_pairs(captioned(10), text_column="caption")
    with pytest.raises(ValueError, match="at least 2 rows"):
        matching_pairs(captioned(1))
    one_class = captioned(10, classes=1)
    with pytest.raises(ValueError, match="more than half"):
        matching_pairs(one_class, group_column="label")


def test_fashion_mnist_matching_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        write_split(tmp_path, split, rng.integers(0, 255, size=(n, 28, 28)).astype(np.uint8), labels)
    pairs = fashion_mnist_matching(data_dir=tmp_path, seed=0)
    assert {k: len(v) for k, v in pairs.items()} == {"train": 40, "validation": 20}
    assert Counter(pairs["validation"]["label"]) == {0: 10, 1: 10}
    # A mismatched caption names another class than the image's.
    from mmkd.data.fashion_mnist import fashion_mnist_captions

    test = fashion_mnist_captions("test", data_dir=tmp_path, seed=0)
    for row in pairs["validation"]:
        same_class = test[row["source_index"]]["label"] == test[row["caption_index"]]["label"]
        assert same_class == (row["label"] == 1)


# ------------------------------------------------------------------- the derangement draws as it always did


def derangement_before_the_restructure(groups: np.ndarray, rng: np.random.Generator, max_tries: int = 1000):
    """``pairs._foreign_derangement`` as the published Fashion-MNIST pairs were drawn, kept as the reference."""
    n = len(groups)
    perm = rng.permutation(n)
    for _ in range(max_tries):
        clash = np.flatnonzero(groups[perm] == groups)
        if clash.size == 0:
            return perm
        others = rng.integers(0, n, size=clash.size)
        for i, j in zip(clash, others, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
    raise RuntimeError("no group-respecting derangement found; the groups are too unbalanced")


@pytest.mark.parametrize("max_tries", [1, 2, 1000])
def test_group_derangement_draws_exactly_as_before(max_tries):
    checked = gave_up = 0
    for seed in range(300):
        draw = np.random.default_rng(seed)
        n = int(draw.integers(2, 40))
        groups = draw.integers(0, int(draw.integers(2, 6)), size=n)
        if np.unique(groups, return_counts=True)[1].max() * 2 > n:
            continue
        old_rng, new_rng = np.random.default_rng(seed + 10_000), np.random.default_rng(seed + 10_000)
        new = _foreign_derangement(groups, new_rng, max_tries=max_tries)
        assert sorted(new) == list(range(n)) and not (groups[new] == groups).any()
        try:
            old = derangement_before_the_restructure(groups, old_rng, max_tries=max_tries)
        except RuntimeError:
            gave_up += 1  # the old code gave up here; the targeted repair now finishes the job (checked above)
            continue
        checked += 1
        assert new.tolist() == old.tolist(), seed
        # The generator is left where it was: matching_pairs draws its final shuffle from it next.
        assert new_rng.integers(1 << 62) == old_rng.integers(1 << 62)
    # Few rounds: the old code mostly gave up (the repair is exercised); the default 1000: it never did.
    assert checked > 0 and (gave_up > 100 if max_tries < 3 else (checked > 200 and gave_up == 0))


# Permutations the pre-restructure code drew (seeds 0, 1, 2), including a group holding exactly half the rows.
PINNED_DERANGEMENTS = {
    (0,) * 6 + (1,) * 3 + (2,) * 3: [
        [6, 9, 7, 10, 8, 11, 4, 3, 0, 2, 5, 1],
        [6, 10, 7, 11, 8, 9, 5, 0, 2, 4, 1, 3],
        [10, 8, 6, 9, 11, 7, 5, 0, 3, 4, 2, 1],
    ],
    (0,) * 5 + (1,) * 5: [[5, 6, 9, 7, 8, 3, 2, 4, 0, 1], [9, 7, 8, 6, 5, 0, 1, 4, 2, 3], [6, 5, 8, 7, 9, 4, 0, 1, 3, 2]],
    (0,) * 7 + (1,) * 4 + (2,) * 2 + (3,): [
        [12, 7, 9, 11, 13, 8, 10, 5, 3, 2, 4, 1, 0, 6],
        [11, 10, 9, 12, 8, 7, 13, 1, 0, 2, 4, 6, 3, 5],
        [13, 12, 10, 8, 9, 11, 7, 6, 3, 5, 0, 4, 1, 2],
    ],
}


def test_pinned_derangements():
    for groups, expected in PINNED_DERANGEMENTS.items():
        got = [_foreign_derangement(np.array(groups), np.random.default_rng(s)).tolist() for s in range(3)]
        assert got == expected


# fashion_mnist_matching on the files below, as drawn before the restructure: (source_index, caption_index).
PINNED_FASHION_MNIST = {
    0: {
        "train": (
            [20, 6, 14, 1, 9, 2, 11, 23, 12, 21, 3, 5, 13, 16, 8, 17, 0, 15, 10, 4, 7, 19, 18, 22],
            [20, 6, 0, 16, 15, 2, 11, 23, 13, 21, 3, 7, 12, 5, 8, 1, 17, 14, 10, 4, 19, 9, 18, 22],
        ),
        "validation": ([7, 0, 4, 11, 3, 5, 2, 9, 6, 1, 8, 10], [7, 8, 4, 11, 1, 5, 2, 9, 10, 6, 3, 0]),
    },
    1: {
        "train": (
            [14, 22, 10, 13, 4, 18, 12, 19, 9, 0, 20, 21, 5, 7, 17, 8, 11, 2, 16, 1, 6, 15, 3, 23],
            [6, 22, 5, 4, 8, 3, 12, 18, 14, 9, 20, 21, 10, 7, 17, 13, 11, 2, 16, 1, 0, 15, 19, 23],
        ),
        "validation": ([7, 3, 4, 8, 10, 1, 9, 6, 11, 5, 0, 2], [7, 2, 4, 8, 9, 6, 10, 1, 11, 5, 0, 3]),
    },
}


def test_fashion_mnist_pairs_are_the_published_ones(tmp_path):
    from tests.test_fashion_mnist import tiny_pixels

    train_labels = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 9, 1, 0]  # skewed: swaps needed
    write_split(tmp_path, "train", tiny_pixels(24), np.array(train_labels, dtype=np.uint8))
    write_split(tmp_path, "test", tiny_pixels(12), np.arange(12, dtype=np.uint8) % 3)
    for seed, expected in PINNED_FASHION_MNIST.items():
        pairs = fashion_mnist_matching(data_dir=tmp_path, seed=seed)
        for split, (source, caption) in expected.items():
            assert pairs[split]["source_index"] == source and pairs[split]["caption_index"] == caption
            assert pairs[split]["label"] == [int(s == c) for s, c in zip(source, caption, strict=True)]


def test_foreign_derangement_with_any_clash_test():
    # Straight to the targeted repair (max_rounds=0): one pass, valid whenever a partner exists.
    groups = np.array([0] * 10 + [1] * 6 + [2] * 4)  # one group holds exactly half
    for seed in range(20):
        perm = foreign_derangement(len(groups), lambda a, b: groups[a] == groups[b], np.random.default_rng(seed), 0)
        assert sorted(perm) == list(range(20)) and not (groups[perm] == groups).any()
    # A clash test no permutation satisfies: the error names the row that has no partner.
    with pytest.raises(NoForeignCaption, match="row 0 of 3: no swap gives it a caption") as info:
        foreign_derangement(3, lambda a, b: np.ones(len(a), dtype=bool), np.random.default_rng(0))
    assert info.value.row == 0
