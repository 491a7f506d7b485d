"""Conceptual Captions from the official TSV plus img2dataset webdataset shards or an image folder keyed by row.

The files are written here in the real formats: a ``caption<TAB>url`` TSV with img2dataset's header line, tars laid
out as img2dataset's webdataset writer lays them out (``<key>.jpg``/``.json``/``.txt`` per sample, keys
``shard * 10**oom + row``; with ``--number_sample_per_shard 10`` a key is the TSV row), and an image folder flat
(``12.jpg``) or as ``--output_format files`` writes it (``00001/000000012.jpg`` with ``.txt``/``.json`` beside).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image

from mmkd.data.baddata import BadDataError
from mmkd.data.conceptual_captions import (
    expand_braces,
    load_conceptual_captions,
    resolve_shards,
    shard_for_process,
)

ROWS = 30
PER_SHARD = 10  # img2dataset --number_sample_per_shard 10: keys are 10**1 * shard + i, i.e. the TSV row
MALFORMED_ROWS = {7: "a caption\thttps://example.com/7.jpg\tan extra column", 8: "a caption\tnot-a-url"}


def tsv_caption(row: int) -> str:
    return f"a photo of object number {row}"


def txt_caption(row: int) -> str:
    return f"object {row}, as the .txt member says"


def url(row: int) -> str:
    return f"https://example.com/images/{row}.jpg"


def jpeg(row: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (row * 8 % 256, 100, 200)).save(buf, "JPEG")
    return buf.getvalue()


def write_tsv(path: Path, header: bool = True) -> Path:
    lines = ["caption\turl"] if header else []
    lines += [MALFORMED_ROWS.get(i, f"{tsv_caption(i)}\t{url(i)}") for i in range(ROWS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def img2dataset_json(key: str, row: int, url_: str | None = None) -> bytes:
    meta = {
        "url": url_ or url(row),
        "caption": txt_caption(row),
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 16,
        "height": 12,
        "original_width": 640,
        "original_height": 480,
        "exif": "{}",
        "sha256": "0" * 64,
    }
    return json.dumps(meta, indent=4).encode()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Like webdataset's TarWriter (which img2dataset uses): members ``<key>.<ext>`` in sorted extension order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.uname, info.gname = len(members[ext]), 0o444, "bigdata", "bigdata"
                tar.addfile(info, io.BytesIO(members[ext]))
    return path


def sample(row: int, *, txt: bool = True, image: bytes | None = None) -> tuple[str, dict[str, bytes]]:
    key = f"{row:09d}"
    members = {"jpg": image if image is not None else jpeg(row), "json": img2dataset_json(key, row)}
    if txt:
        members["txt"] = txt_caption(row).encode()
    return key, members


@pytest.fixture(scope="module")
def cc(tmp_path_factory):
    """TSV + 3 shards: 00000 (row 2 corrupt JPEG, row 3 without .txt, rows 4, 6-9 dead), 00001 (clean),
    00002 (truncated inside row 22's image), with img2dataset's stats files beside them."""
    root = tmp_path_factory.mktemp("cc3m")
    tsv = write_tsv(root / "Train_GCC-training.tsv")
    shards = root / "shards"
    shards.mkdir()
    good = jpeg(2)
    write_tar(
        shards / "00000.tar",
        [sample(0), sample(1), sample(2, image=good[: len(good) // 2]), sample(3, txt=False), sample(5)],
    )
    write_tar(shards / "00001.tar", [sample(r) for r in (10, 11, 12, 13)])
    full = write_tar(shards / "full.tar", [sample(r) for r in (20, 21, 22, 23)]).read_bytes()
    (shards / "full.tar").unlink()
    cut = full.index(b"000000022.jpg") + 512 + 100  # 100 bytes into the image data of row 22
    (shards / "00002.tar").write_bytes(full[:cut])
    for i in range(3):
        (shards / f"{i:05d}_stats.json").write_text(json.dumps({"count": 10, "successes": 5}))
        (shards / f"{i:05d}.parquet").write_bytes(b"PAR1 not read by mmkd PAR1")
    return {"root": root, "tsv": tsv, "shards": shards}


GOOD_KEYS = {f"{r:09d}" for r in (0, 1, 5, 10, 11, 12, 13, 20, 21)}
EXPECTED = {(k, txt_caption(int(k))) for k in GOOD_KEYS}


def pairs(ds) -> set[tuple[str, str]]:
    return {(ex["key"], ex["text"]) for ex in ds}


def test_expand_braces_and_shard_specs(cc):
    assert expand_braces("cc3m/{00000..00002}.tar") == ["cc3m/00000.tar", "cc3m/00001.tar", "cc3m/00002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("{2..0}{x}") == ["2{x}", "1{x}", "0{x}"]
    shards = cc["shards"]
    expected = [str(shards / f"{i:05d}.tar") for i in range(3)]
    assert resolve_shards(shards) == expected  # the directory: .tar only, stats/parquet ignored
    assert resolve_shards(f"{shards}/{{00000..00002}}.tar") == expected
    assert resolve_shards(str(shards / "*.tar")) == expected
    assert resolve_shards([shards / "00001.tar", f"{shards}/{{00000,00002}}.tar"]) == [
        expected[1],
        expected[0],
        expected[2],
    ]
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 shards.*00003\.tar"):
        resolve_shards(f"{shards}/{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError, match=r"no files match"):
        resolve_shards(str(shards / "*.tgz"))


def test_shard_handling_lives_in_webdataset_and_is_re_exported():
    from mmkd.data import conceptual_captions, webdataset

    for name in ("expand_braces", "resolve_shards", "shard_for_process"):
        assert getattr(conceptual_captions, name) is getattr(webdataset, name)
        assert name in conceptual_captions.__all__
    assert conceptual_captions.IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")
    assert set(conceptual_captions.SPLIT_TSV) == {"train", "validation"}


def test_map_style_and_streaming_agree_and_count_bad_items(cc, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ds = load_conceptual_captions(shards=cc["shards"], cache_dir=tmp_path)
    assert isinstance(ds, Dataset)
    assert set(ds.column_names) == {"image", "text", "url", "key"}
    assert pairs(ds) == EXPECTED and len(ds) == len(EXPECTED)
    first = ds[0]
    assert first["image"].mode == "RGB" and first["image"].size == (16, 12)
    assert first["url"] == url(int(first["key"]))
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and caplog.records[-1].levelno == logging.WARNING
    line = summary[0]
    assert "Conceptual Captions train (3 shards): skipped 3 of 12 items" in line
    assert "1 unreadable image" in line and "1 missing caption" in line and "1 unreadable shard" in line
    assert "00000.tar, key 000000002: unreadable image" in line
    assert "00000.tar, key 000000003: missing caption (no .txt member)" in line
    assert "00002.tar: unreadable shard" in line and "after 2 samples, in key 000000022" in line

    caplog.clear()
    stream = load_conceptual_captions(shards=f"{cc['shards']}/{{00000..00002}}.tar", streaming=True)
    assert isinstance(stream, IterableDataset) and stream.num_shards == 3
    examples = list(stream)
    assert {(ex["key"], ex["text"]) for ex in examples} == EXPECTED and len(examples) == len(EXPECTED)
    assert all(isinstance(ex["image"], Image.Image) and ex["image"].mode == "RGB" for ex in examples)
    # Streaming logs one line per shard, when that shard's generator finishes.
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Conceptual Captions train /")
    ]
    assert len(lines) == 3
    assert any("00000.tar: skipped 2 of 5 items" in m for m in lines)
    assert any("00001.tar: no bad items in 4" in m for m in lines)
    assert any("00002.tar: skipped 1 of 3 items (1 unreadable shard)" in m for m in lines)


def test_tsv_caption_fills_only_a_missing_txt(cc, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ds = load_conceptual_captions(cc["tsv"], shards=str(cc["shards"] / "*.tar"), cache_dir=tmp_path)
    assert pairs(ds) == EXPECTED | {("000000003", tsv_caption(3))}  # .txt wins wherever it exists
    assert "1 missing caption" not in caplog.text
    # The TSV's row is not used when the sample's .json says the image came from another URL.
    key, members = sample(3, txt=False)
    members["json"] = img2dataset_json(key, 3, url_="https://elsewhere.example.org/3.jpg")
    other = write_tar(tmp_path / "00000.tar", [sample(1), (key, members)])
    caplog.clear()
    ds = load_conceptual_captions(cc["tsv"], shards=[other], streaming=True)
    assert pairs(ds) == {("000000001", txt_caption(1))}
    assert "key 000000003: missing caption (no .txt member; " in caplog.text
    assert "line 5 has URL 'https://example.com/images/3.jpg'" in caplog.text


def test_strict_mode_raises_naming_shard_and_key(cc, tmp_path):
    with pytest.raises(BadDataError, match=r"00000\.tar, key 000000002: unreadable image"):
        load_conceptual_captions(shards=cc["shards"], strict=True, cache_dir=tmp_path)
    stream = load_conceptual_captions(shards=cc["shards"], strict=True, streaming=True)
    with pytest.raises(BadDataError, match=r"00000\.tar, key 000000002: unreadable image"):
        list(stream)
    with pytest.raises(BadDataError, match=r"00002\.tar: unreadable shard \(ReadError"):
        list(load_conceptual_captions(shards=cc["shards"] / "00002.tar", strict=True, streaming=True))
    clean = load_conceptual_captions(shards=cc["shards"] / "00001.tar", strict=True, cache_dir=tmp_path)
    assert len(clean) == 4


def keys_of(batch):
    return [ex["key"] for ex in batch]


def test_two_dataloader_workers_yield_every_sample_once(cc):
    stream = load_conceptual_captions(shards=cc["shards"], streaming=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=keys_of)
    seen = Counter(k for batch in loader for k in batch)
    assert seen == Counter(GOOD_KEYS)


def test_split_by_node_gives_disjoint_complete_parts(cc, monkeypatch):
    # 3 shards over 2 processes: every process reads all shards and keeps every other sample.
    stream = load_conceptual_captions(shards=cc["shards"], streaming=True)
    parts = [[ex["key"] for ex in split_dataset_by_node(stream, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(GOOD_KEYS)
    # 2 shards over 2 processes: each process reads only its own shard.
    two = load_conceptual_captions(
        shards=[cc["shards"] / "00000.tar", cc["shards"] / "00001.tar"], streaming=True
    )
    parts = [{ex["key"] for ex in shard_for_process(two, rank=r, world_size=2)} for r in (0, 1)]
    assert parts == [
        {"000000000", "000000001", "000000005"},
        {"000000010", "000000011", "000000012", "000000013"},
    ]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert {ex["key"] for ex in shard_for_process(two)} == parts[1]
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_for_process(two, rank=2, world_size=2)


@pytest.fixture(scope="module")
def image_dirs(cc):
    """Rows 0-11 downloaded except row 4 (dead URL); row 5's file is corrupt; rows 12-29 dead. Flat and nested."""
    flat, nested = cc["root"] / "flat", cc["root"] / "files"
    flat.mkdir()
    for row in range(12):
        if row == 4:
            continue
        data = b"\xff\xd8\xff\xe0 this is not a JPEG" if row == 5 else jpeg(row)
        (flat / f"{row}.jpg").write_bytes(data)
        folder = nested / f"{row // PER_SHARD:05d}"  # img2dataset --output_format files
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row:09d}.jpg").write_bytes(data)
        (folder / f"{row:09d}.txt").write_text(txt_caption(row))
        (folder / f"{row:09d}.json").write_bytes(img2dataset_json(f"{row:09d}", row))
    (nested / "00000.parquet").write_bytes(b"PAR1")
    return flat, nested


IMAGE_DIR_KEYS = {f"{r:09d}" for r in (0, 1, 2, 3, 6, 9, 10, 11)}


def test_image_dir_with_tsv(cc, image_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    flat, _ = image_dirs
    ds = load_conceptual_captions(cc["tsv"], image_dir=flat, cache_dir=tmp_path)
    assert pairs(ds) == {(k, tsv_caption(int(k))) for k in IMAGE_DIR_KEYS}
    ex = ds[0]
    assert ex["key"] == "000000000" and ex["url"] == url(0) and ex["image"].size == (16, 12)
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 22 of 30 items (19 missing image, 2 malformed TSV row, 1 unreadable image)" in line
    # 1-based file lines (line 1 is the header); missing images are counted but not listed as offenders.
    assert "Train_GCC-training.tsv line 9: malformed TSV row (expected 2 tab-separated columns" in line
    assert "line 10: malformed TSV row (bad URL 'not-a-url')" in line
    assert f"{flat / '5.jpg'} (" in line and "line 7): unreadable image" in line
    assert "row 4" not in line
    # Strict mode stops at the first TSV row without an image, too.
    with pytest.raises(BadDataError, match=r"line 6 \(row 4\): missing image"):
        load_conceptual_captions(cc["tsv"], image_dir=flat, strict=True, cache_dir=tmp_path)


def test_image_dir_zero_padded_nested_layout(cc, image_dirs, tmp_path):
    _, nested = image_dirs
    tsv = write_tsv(
        tmp_path / "no_header.tsv", header=False
    )  # the official file, without img2dataset's header
    ds = load_conceptual_captions(tsv, image_dir=nested, cache_dir=tmp_path)
    expected = {(k, tsv_caption(int(k))) for k in IMAGE_DIR_KEYS}
    assert pairs(ds) == expected
    stream = load_conceptual_captions(cc["root"], image_dir=nested, streaming=True)  # tsv= the folder
    assert pairs(stream) == expected
    with pytest.raises(BadDataError, match=r"no_header\.tsv line 5 \(row 4\): missing image"):
        load_conceptual_captions(tsv, image_dir=nested, strict=True, cache_dir=tmp_path)


def test_max_samples(cc, image_dirs, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ds = load_conceptual_captions(shards=cc["shards"], max_samples=2, cache_dir=tmp_path)
    assert [ex["key"] for ex in ds] == ["000000000", "000000001"]
    assert "(stopped at max_samples=2): no bad items in 2" in caplog.text
    stream = load_conceptual_captions(shards=cc["shards"], max_samples=4, streaming=True)
    assert [ex["key"] for ex in stream] == ["000000000", "000000001", "000000005", "000000010"]
    assert (
        len(load_conceptual_captions(cc["tsv"], image_dir=image_dirs[0], max_samples=3, cache_dir=tmp_path))
        == 3
    )


def test_clear_errors_before_any_work(cc, image_dirs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"tsv: no such file '.*nope\.tsv'"):
        load_conceptual_captions(tmp_path / "nope.tsv", shards=cc["shards"])
    with pytest.raises(
        FileNotFoundError, match=r"no Validation_GCC-1\.1\.0-Validation\.tsv in this directory"
    ):
        load_conceptual_captions(cc["root"], image_dir=image_dirs[0], split="validation")
    with pytest.raises(FileNotFoundError, match=r"shards='.*empty': no \.tar files in this directory"):
        load_conceptual_captions(shards=empty)
    with pytest.raises(FileNotFoundError, match=r"shards: no such file '.*99999\.tar'"):
        load_conceptual_captions(shards=[cc["shards"] / "00000.tar", cc["shards"] / "99999.tar"])
    with pytest.raises(FileNotFoundError, match=r"no files match"):
        load_conceptual_captions(shards=str(tmp_path / "*.tar"), streaming=True)
    with pytest.raises(FileNotFoundError, match=r"image_dir: '.*missing_dir' is not a directory"):
        load_conceptual_captions(cc["tsv"], image_dir=tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match=r"no image files named by TSV row"):
        load_conceptual_captions(cc["tsv"], image_dir=empty)
    with pytest.raises(ValueError, match=r"image_dir= needs tsv="):
        load_conceptual_captions(image_dir=image_dirs[0])
    with pytest.raises(ValueError, match=r"no images given"):
        load_conceptual_captions(cc["tsv"])
    with pytest.raises(ValueError, match=r"split='test'"):
        load_conceptual_captions(shards=cc["shards"], split="test")
    with pytest.raises(ValueError, match=r"max_samples=0"):
        load_conceptual_captions(shards=cc["shards"], max_samples=0)
