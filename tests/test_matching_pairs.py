"""mmkd.data.pairs: balanced matching pairs from any captioned dataset (Fashion-MNIST offline)."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from mmkd.data.pairs import fashion_mnist_matching, matching_pairs
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
