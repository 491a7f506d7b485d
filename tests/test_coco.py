"""The COCO image-text matching builder, on small files in the real COCO captions format."""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Value
from datasets import Image as ImageFeature
from PIL import Image

from mmkd.data.baddata import BadDataError
from mmkd.data.coco import build_coco_matching

# train2017: 12 images listed, 3-5 captions each; 111's file is missing, 112's corrupt: 10 are usable.
TRAIN = {image_id: 3 + image_id % 3 for image_id in range(101, 113)}
MISSING, CORRUPT = 111, 112
# An annotation row without its caption, and one about an image the file does not list.
MALFORMED_ROW = {"id": 9001, "image_id": 103}
UNKNOWN_IMAGE_ROW = {"id": 9002, "image_id": 999, "caption": "A caption about an image nobody listed."}
VAL = {image_id: 3 + image_id % 3 for image_id in range(201, 207)}
OBJECTS = ("dog", "bus", "pizza", "kite", "giraffe", "surfboard", "clock", "train")

COLUMNS = ["text", "label", "image_id", "caption_id", "caption_image_id"]


def caption_text(image_id: int, k: int) -> str:
    # With the stray whitespace real COCO captions have.
    return f"  A {OBJECTS[(image_id + k) % len(OBJECTS)]} in picture {image_id}, caption {k}.\n"


def caption_id(image_id: int, k: int) -> int:
    return image_id * 10 + k


def jpeg_bytes(image_id: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (image_id % 256, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


def noise_jpeg_bytes(seed: int) -> bytes:
    """A JPEG big enough that cutting it short leaves a valid header but undecodable pixels."""
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def file_name(image_id: int, folder: str, year: int) -> str:
    # The two releases name their files differently: COCO_train2014_000000000101.jpg vs 000000000101.jpg.
    return f"COCO_{folder}_{image_id:012d}.jpg" if year == 2014 else f"{image_id:012d}.jpg"


def write_split(
    ann_path: Path,
    image_dir: Path,
    counts: dict[int, int],
    *,
    folder: str,
    year: int = 2017,
    missing=(),
    corrupt=(),
    truncated=(),
    extra_rows=(),
    texts: dict[int, list[str]] | None = None,
) -> None:
    """A COCO captions JSON with the real key structure, and the images it lists."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, n in counts.items():
        name = file_name(image_id, folder, year)
        images.append(
            {
                "license": 3,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
                "height": 8,
                "width": 8,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": f"http://farm3.staticflickr.com/{image_id}.jpg",
                "id": image_id,
            }
        )
        captions = texts[image_id] if texts else [caption_text(image_id, k) for k in range(n)]
        annotations += [
            {"image_id": image_id, "id": caption_id(image_id, k), "caption": c}
            for k, c in enumerate(captions)
        ]
        if image_id in missing:
            continue
        if image_id in corrupt:
            data = b"\x00 not a jpeg at all"
        elif image_id in truncated:
            full = noise_jpeg_bytes(image_id)
            data = full[: len(full) * 6 // 10]
        else:
            data = jpeg_bytes(image_id)
        (image_dir / name).write_bytes(data)
    annotations += list(extra_rows)
    coco = {
        "info": {
            "description": "COCO 2017 Dataset",
            "url": "http://cocodataset.org",
            "version": "1.0",
            "year": year,
            "contributor": "COCO Consortium",
            "date_created": "2017/09/01",
        },
        "licenses": [
            {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3, "name": "CC BY-NC-SA"}
        ],
        "images": images,
        "annotations": annotations,
    }
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(coco))


def write_root(root: Path, year: int = 2017) -> Path:
    write_split(
        root / "annotations" / f"captions_train{year}.json",
        root / f"train{year}",
        TRAIN,
        folder=f"train{year}",
        year=year,
        missing={MISSING},
        corrupt={CORRUPT},
        extra_rows=[MALFORMED_ROW, UNKNOWN_IMAGE_ROW],
    )
    write_split(
        root / "annotations" / f"captions_val{year}.json",
        root / f"val{year}",
        VAL,
        folder=f"val{year}",
        year=year,
    )
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_root(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def built(coco_root):
    return build_coco_matching(coco_root)


def rows(ds) -> list[dict]:
    return ds.select_columns(COLUMNS).to_list()


def own_captions(counts: dict[int, int], image_id: int) -> dict[int, str]:
    return {caption_id(image_id, k): caption_text(image_id, k).strip() for k in range(counts[image_id])}


def usable(counts: dict[int, int]) -> dict[int, int]:
    return {i: n for i, n in counts.items() if i not in (MISSING, CORRUPT)}


class FakeEncoder:
    """A text encoder with fixed embeddings per text; records what it was asked to encode."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.encoded: list[str] = []

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.encoded += texts
        return torch.nn.functional.normalize(
            torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32)
        )


class HashEncoder(FakeEncoder):
    """Pseudo-random unit vectors, a fixed one per text."""

    def __init__(self):
        super().__init__({})

    def encode_texts(self, texts):
        self.encoded += texts
        vecs = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in texts]
        return torch.nn.functional.normalize(torch.tensor(np.stack(vecs), dtype=torch.float32))


# ------------------------------------------------------------------------------------------ the basics


def test_splits_columns_and_image_paths(built, coco_root):
    assert list(built) == ["train", "validation"]
    ds = built["train"]
    assert isinstance(ds.features["image"], ImageFeature)
    assert ds.features["label"] == ClassLabel(names=["mismatch", "match"])
    for column in ("image_id", "caption_id", "caption_image_id"):
        assert ds.features[column] == Value("int64")
    first = ds[0]
    assert first["image"].size == (8, 8)
    # Stored as the absolute path, not the bytes: the table stays small.
    stored = ds.cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert stored["bytes"] is None
    assert stored["path"] == str((coco_root / "train2017" / f"{first['image_id']:012d}.jpg").resolve())


@pytest.mark.parametrize("split,counts", [("train", usable(TRAIN)), ("validation", VAL)])
def test_one_caption_per_image_balanced_and_never_its_own_when_mismatched(built, split, counts):
    table = rows(built[split])
    assert sorted(r["image_id"] for r in table) == sorted(counts)  # every usable image exactly once
    assert Counter(r["label"] for r in table) == {0: len(counts) // 2, 1: len(counts) // 2}
    for r in table:
        own = own_captions(counts, r["image_id"])
        assert (
            r["text"] == own_captions(counts, r["caption_image_id"])[r["caption_id"]]
        )  # text is that caption
        if r["label"] == 1:
            assert r["caption_image_id"] == r["image_id"] and r["caption_id"] in own
        else:
            assert r["caption_image_id"] != r["image_id"]
            assert r["caption_id"] not in own and r["text"] not in own.values()
    # The mismatched captions are the mismatched images' own captions, permuted: each caption in one row only.
    assert len({r["caption_id"] for r in table}) == len(table)
    mismatched = [r for r in table if r["label"] == 0]
    assert {r["caption_image_id"] for r in mismatched} == {r["image_id"] for r in mismatched}
    labels = [r["label"] for r in table]
    assert labels not in (sorted(labels), sorted(labels, reverse=True))  # interleaved, not two blocks


def test_deterministic_for_a_seed_and_different_for_another(built, coco_root):
    again = build_coco_matching(coco_root, seed=0)
    other = build_coco_matching(coco_root, seed=1)
    for split in built:
        assert rows(again[split]) == rows(built[split])
        assert rows(other[split]) != rows(built[split])


# The validation rows (image_id, caption_id, label) the pre-restructure code built: a seed's pairs must not move.
PINNED_VALIDATION = {
    (0, "one"): [(203, 2040, 0), (201, 2010, 1), (202, 2034, 0), (204, 2020, 0), (205, 2052, 1), (206, 2060, 1)],
    (3, "all"): [
        (201, 2012, 1), (206, 2060, 1), (202, 2021, 1), (206, 2051, 0), (203, 2042, 0), (202, 2052, 0),
        (201, 2020, 0), (205, 2050, 1), (202, 2033, 0), (205, 2023, 0), (203, 2010, 0), (205, 2041, 0),
        (203, 2034, 1), (206, 2030, 0), (206, 2063, 1), (203, 2032, 1), (205, 2061, 0), (204, 2053, 0),
        (206, 2062, 1), (202, 2022, 1), (204, 2040, 1), (201, 2011, 1), (204, 2064, 0), (203, 2031, 1),
    ],
}


@pytest.mark.parametrize("seed,captions", list(PINNED_VALIDATION))
def test_the_rows_for_a_seed_are_the_ones_built_before(coco_root, seed, captions):
    ds = build_coco_matching(coco_root, splits=["validation"], seed=seed, captions=captions)["validation"]
    got = [(r["image_id"], r["caption_id"], r["label"]) for r in rows(ds)]
    assert got == PINNED_VALIDATION[seed, captions]


def test_each_split_draws_from_its_own_stream(built, coco_root):
    alone = build_coco_matching(coco_root, splits=["validation"])
    assert list(alone) == ["validation"]
    assert rows(alone["validation"]) == rows(built["validation"])


def test_max_images_takes_a_seeded_subset_and_odd_counts_stay_balanced(coco_root):
    ds = build_coco_matching(coco_root, splits=["validation"], max_images=5)["validation"]
    table = rows(ds)
    assert len(table) == 5 and {r["image_id"] for r in table} <= set(VAL)
    assert Counter(r["label"] for r in table) == {1: 2, 0: 3}
    assert rows(build_coco_matching(coco_root, splits=["validation"], max_images=5)["validation"]) == table
    subsets = {
        frozenset(
            r["image_id"]
            for r in rows(
                build_coco_matching(coco_root, splits=["validation"], seed=s, max_images=3)["validation"]
            )
        )
        for s in range(4)
    }
    assert len(subsets) > 1  # the subset depends on the seed


def test_all_captions_every_caption_once_and_balanced(coco_root):
    built = build_coco_matching(coco_root, captions="all", seed=3)
    for split, counts in (("train", usable(TRAIN)), ("validation", VAL)):
        table = rows(built[split])
        total = sum(counts.values())
        assert len(table) == total
        assert Counter(r["label"] for r in table) == {1: total // 2, 0: total - total // 2}
        assert sorted(r["caption_id"] for r in table) == sorted(
            cid for image_id in counts for cid in own_captions(counts, image_id)
        )
        assert Counter(r["image_id"] for r in table) == counts  # an image with c captions is in c rows
        for r in table:
            own = own_captions(counts, r["image_id"])
            if r["label"] == 1:
                assert r["caption_image_id"] == r["image_id"] and r["text"] == own[r["caption_id"]]
            else:
                assert r["caption_image_id"] != r["image_id"] and r["text"] not in own.values()


@pytest.mark.parametrize("captions", ["one", "all"])
def test_never_an_own_caption_whatever_the_seed(tmp_path, captions):
    # Images 1 and 2 have the same caption text up to case and spacing: neither may be the other's mismatch.
    texts = {i: [text, f"Another view of scene {i}."] for i, (text, _) in HARD_CAPTIONS.items()}
    write_split(
        tmp_path / "val.json", tmp_path / "imgs", dict.fromkeys(texts, 2), folder="val2017", texts=texts
    )
    args = {"annotations": {"validation": tmp_path / "val.json"}, "images": {"validation": tmp_path / "imgs"}}
    for seed in range(15):
        table = rows(build_coco_matching(**args, seed=seed, captions=captions)["validation"])
        for r in table:
            own = {t.lower().replace("  ", " ").rstrip(".") for t in texts[r["image_id"]]}
            same_text = r["text"].lower().replace("  ", " ").rstrip(".") in own
            assert same_text == (r["label"] == 1), (seed, r)


# -------------------------------------------------------------------------------------------- bad data


def test_bad_images_and_rows_are_skipped_counted_and_logged(built, coco_root, caplog):
    train = rows(built["train"])
    assert {MISSING, CORRUPT}.isdisjoint(r["image_id"] for r in train)
    assert 999 not in {r["caption_image_id"] for r in train}
    with caplog.at_level(logging.INFO):
        build_coco_matching(coco_root)
    lines = [
        r.getMessage() for r in caplog.records if "COCO train (captions_train2017.json)" in r.getMessage()
    ]
    seen = len(TRAIN) + sum(TRAIN.values()) + 2  # image entries + annotation rows
    expected = f"COCO train (captions_train2017.json): skipped 4 of {seen} items ("
    summary = next(line for line in lines if line.startswith(expected))
    for part in ("1 missing image", "1 unreadable image", "1 malformed annotation", "1 unknown image id"):
        assert part in summary
    assert f"{MISSING:012d}.jpg" in summary and f"{CORRUPT:012d}.jpg" in summary
    assert "(annotation id 9001): malformed annotation (missing or invalid caption)" in summary
    assert expected in built["train"].info.description
    assert "no bad items" in built["validation"].info.description


def test_strict_mode_raises_naming_the_malformed_annotation(coco_root):
    with pytest.raises(
        BadDataError, match=r"captions_train2017\.json annotations\[\d+\] \(annotation id 9001\)"
    ):
        build_coco_matching(coco_root, strict=True)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_strict_mode_raises_naming_the_bad_image_file(tmp_path, problem):
    kwargs = {"missing": {203}} if problem == "missing" else {"corrupt": {203}}
    write_split(tmp_path / "val.json", tmp_path / "val2017", VAL, folder="val2017", **kwargs)
    reason = "missing image" if problem == "missing" else "unreadable image"
    args = {
        "annotations": {"validation": tmp_path / "val.json"},
        "images": {"validation": tmp_path / "val2017"},
    }
    with pytest.raises(BadDataError, match=rf"val2017/000000000203\.jpg: {reason}"):
        build_coco_matching(**args, strict=True)
    assert 203 not in {r["image_id"] for r in rows(build_coco_matching(**args)["validation"])}


def test_every_row_decodes_whatever_verify_images_says(tmp_path):
    write_split(tmp_path / "val.json", tmp_path / "imgs", VAL, folder="val2017", truncated={204})
    args = {"annotations": {"validation": tmp_path / "val.json"}, "images": {"validation": tmp_path / "imgs"}}
    # A truncated JPEG has a valid header: the default check decodes JPEGs at 1/8 scale, which reads the whole scan,
    # and a full decode (here on two threads) does too; both drop and count it.
    for ds in (build_coco_matching(**args)["validation"],
               build_coco_matching(**args, verify_images=True, num_proc=2)["validation"]):
        assert 204 not in {r["image_id"] for r in rows(ds)}
        assert "1 unreadable image" in ds.info.description and "truncated" in ds.info.description
        for image in ds["image"]:  # every row the builder returns decodes
            image.load()


# -------------------------------------------------------------------------------------- hard negatives

# One caption per image; vectors chosen so that each image's most similar foreign caption is known by hand.
HARD_CAPTIONS = {
    1: ("A cat sleeping on a sofa.", [1.0, 0.0, 0.0]),
    2: ("a cat  sleeping on a sofa", [0.96, 0.28, 0.0]),  # the same text as image 1's: never 1's negative
    3: ("A dog sleeping on a sofa.", [0.8, 0.6, 0.0]),
    4: ("A plane in a blue sky.", [0.0, 0.0, 1.0]),
    5: ("A helicopter in a blue sky.", [0.0, 0.6, 0.8]),
    6: ("A bowl of fruit on a table.", [0.0, 1.0, 0.0]),
    7: ("A plate of fruit on a table.", [0.0, 0.8, 0.6]),
}
# 1 and 2 would be each other's nearest (cosine 0.96) but say the same thing, so both get the dog.
EXPECTED_NEGATIVE = {1: 3, 2: 3, 3: 2, 4: 5, 5: 7, 6: 7, 7: 5}


def test_hard_negatives_pick_the_most_similar_caption_of_another_image(tmp_path):
    texts = {i: [text] for i, (text, _) in HARD_CAPTIONS.items()}
    write_split(
        tmp_path / "val.json",
        tmp_path / "imgs",
        dict.fromkeys(HARD_CAPTIONS, 1),
        folder="val2017",
        texts=texts,
    )
    encoder = FakeEncoder({text: vec for text, vec in HARD_CAPTIONS.values()})
    args = {"annotations": {"validation": tmp_path / "val.json"}, "images": {"validation": tmp_path / "imgs"}}
    mismatched_images = set()
    for seed in range(6):
        table = rows(build_coco_matching(**args, seed=seed, hard_negatives=encoder)["validation"])
        assert Counter(r["label"] for r in table) == {1: 3, 0: 4}
        for r in table:
            if r["label"] == 0:
                assert r["caption_image_id"] == EXPECTED_NEGATIVE[r["image_id"]]
                assert r["text"] == HARD_CAPTIONS[r["caption_image_id"]][0]
                mismatched_images.add(r["image_id"])
            else:
                assert r["caption_image_id"] == r["image_id"]
    assert mismatched_images == set(HARD_CAPTIONS)  # every image was a mismatch under some seed
    assert len(encoder.encoded) == 6 * len(HARD_CAPTIONS)  # each text encoded once per build


def test_hard_negatives_change_only_the_mismatched_captions(coco_root, built):
    encoder = HashEncoder()
    hard = rows(build_coco_matching(coco_root, splits=["train"], hard_negatives=encoder)["train"])
    random = rows(built["train"])
    counts = usable(TRAIN)
    # Same kept captions, halves and order as the random build; the pool is all captions of the other images.
    assert [(r["image_id"], r["label"]) for r in hard] == [(r["image_id"], r["label"]) for r in random]
    kept = {r["caption_image_id"]: r["caption_id"] for r in random}  # random mismatches permute kept captions
    pool = {
        cid: (image_id, text) for image_id in counts for cid, text in own_captions(counts, image_id).items()
    }
    vectors = dict(zip(encoder.encoded, HashEncoder().encode_texts(encoder.encoded).numpy(), strict=True))
    for h, r in zip(hard, random, strict=True):
        if h["label"] == 1:
            assert h == r
            continue
        query = vectors[pool[kept[h["image_id"]]][1]]
        expected = max(
            (cid for cid, (owner, _) in pool.items() if owner != h["image_id"]),
            key=lambda cid: float(query @ vectors[pool[cid][1]]),
        )
        assert h["caption_id"] == expected and h["caption_image_id"] != h["image_id"]


def test_hard_negatives_load_a_model_spec_through_load_encoder(coco_root, monkeypatch):
    import mmkd.eval.encoders

    calls = []

    def fake_load_encoder(spec, **kwargs):
        calls.append(spec)
        return HashEncoder()

    monkeypatch.setattr(mmkd.eval.encoders, "load_encoder", fake_load_encoder)
    ds = build_coco_matching(coco_root, splits=["validation"], hard_negatives="org/some-clip")["validation"]
    assert calls == ["org/some-clip"]  # loaded once for all splits
    assert all(r["caption_image_id"] != r["image_id"] for r in rows(ds) if r["label"] == 0)


# ------------------------------------------------------------------------------------- where files are


def test_explicit_annotation_and_image_paths(tmp_path, built):
    write_split(tmp_path / "elsewhere" / "my-val.json", tmp_path / "pictures", VAL, folder="val2017")
    ds = build_coco_matching(
        annotations={"validation": tmp_path / "elsewhere" / "my-val.json"},
        images={"validation": str(tmp_path / "pictures")},
    )
    assert list(ds) == ["validation"]  # the splits default to the given ones
    assert rows(ds["validation"]) == rows(built["validation"])  # same content, same rows
    path = ds["validation"].cast_column("image", ImageFeature(decode=False))[0]["image"]["path"]
    assert Path(path).parent == (tmp_path / "pictures").resolve()


def test_2014_layout(tmp_path):
    root = write_root(tmp_path, year=2014)
    ds = build_coco_matching(root, year=2014)
    assert list(ds) == ["train", "validation"]
    assert len(ds["train"]) == len(usable(TRAIN)) and len(ds["validation"]) == len(VAL)
    path = ds["train"].cast_column("image", ImageFeature(decode=False))[0]["image"]["path"]
    assert Path(path).parent.name == "train2014" and Path(path).name.startswith("COCO_train2014_")
    with pytest.raises(FileNotFoundError, match=r"annotations/captions_train2017\.json"):
        build_coco_matching(root)  # year=2017 on a 2014 folder


# ------------------------------------------------------------------------------------------- bad input


def test_missing_annotation_file_and_image_folder(tmp_path):
    write_split(
        tmp_path / "annotations" / "captions_val2017.json", tmp_path / "val2017", VAL, folder="val2017"
    )
    with pytest.raises(
        FileNotFoundError, match=r"split 'train' not found: .*annotations/captions_train2017\.json"
    ):
        build_coco_matching(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image folder for split 'validation' not found: .*nowhere"):
        build_coco_matching(tmp_path, splits=["validation"], images={"validation": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="COCO root folder not found"):
        build_coco_matching(tmp_path / "no-such-root")


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"images": [], "annotations": [', r"broken\.json is not valid JSON \(JSONDecodeError"),
        ("[1, 2]", r"broken\.json: expected a COCO captions JSON object, got a JSON list"),
        ('{"images": []}', r"broken\.json: the 'annotations' field is missing"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], '
            '"annotations": [{"id": 5, "image_id": 1, "bbox": []}]}',
            r"broken\.json: no annotation has a 'caption' field",
        ),
    ],
)
def test_malformed_annotation_file(tmp_path, content, message):
    (tmp_path / "broken.json").write_text(content)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match=message):
        build_coco_matching(
            annotations={"validation": tmp_path / "broken.json"}, images={"validation": tmp_path / "imgs"}
        )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"captions": "some"}, r"captions must be one of \('one', 'all'\), got 'some'"),
        ({"year": 2015}, r"year must be one of \(2014, 2017\) \(the COCO captions releases\), got 2015"),
        ({"max_images": 0}, "max_images must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"splits": ["test"]}, r"split 'test' has no standard COCO 2017 layout"),
        (
            {"splits": ["train", "validation"], "annotations": {"val": "x.json"}},
            r"annotations has split\(s\) \['val'\] that are not among splits",
        ),
    ],
)
def test_bad_arguments(coco_root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_coco_matching(coco_root, **kwargs)


def test_no_root_and_no_files_for_a_split():
    with pytest.raises(ValueError, match=r"no images for split 'validation': pass root="):
        build_coco_matching(annotations={"validation": "val.json"})


def test_one_image_filling_over_half_the_mismatched_rows(tmp_path):
    counts = {1: 10, 2: 1, 3: 1}  # captions="all": image 1 owns 10 of the 12 rows, so most mismatched rows
    write_split(tmp_path / "val.json", tmp_path / "imgs", counts, folder="val2017")
    args = {"annotations": {"validation": tmp_path / "val.json"}, "images": {"validation": tmp_path / "imgs"}}
    with pytest.raises(ValueError, match=r"one image \(id 1\) or its caption texts fill over half of the 6 mismatched"):
        build_coco_matching(**args, captions="all")


def test_too_few_images(coco_root):
    with pytest.raises(ValueError, match="2 usable image.*at least 3"):
        build_coco_matching(coco_root, splits=["validation"], max_images=2)
