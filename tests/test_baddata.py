"""The shared skip-and-count handling of bad images and rows, and the one image probe every builder uses."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mmkd.data.baddata import BadDataError, BadDataReport, probe_image
from mmkd.data.coco import build_coco_matching
from mmkd.data.conceptual_captions import load_conceptual_captions
from tests import test_coco as coco_files
from tests import test_conceptual_captions as cc


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:60])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    return good, truncated, corrupt, tmp_path / "missing.jpg"


def test_bad_images_are_skipped_counted_and_named(files):
    good, truncated, corrupt, missing = files
    report = BadDataReport(keep_examples=2)
    loaded = [report.load_image(p) for p in (good, truncated, corrupt, missing)]
    assert loaded[0].size == (20, 10) and loaded[0].mode == "RGB"
    assert loaded[1:] == [None, None, None]
    assert report.seen == 4 and report.skipped == 3
    assert report.counts == {"unreadable image": 2, "missing image": 1}
    line = report.summary("test set")
    assert line.startswith("test set: skipped 3 of 4 items (2 unreadable image, 1 missing image)")
    assert "truncated.jpg" in line and "corrupt.png" in line and "missing.jpg" not in line  # first 2 only


def test_strict_mode_raises_on_the_first_bad_item(files):
    good, truncated, _, missing = files
    report = BadDataReport(strict=True)
    assert report.load_image(good) is not None
    with pytest.raises(BadDataError, match="truncated.jpg: unreadable image"):
        report.load_image(truncated)
    with pytest.raises(BadDataError, match="row 7: malformed annotation"):
        report.bad("malformed annotation", "row 7")


def test_clean_run_summary():
    report = BadDataReport()
    report.seen = 10
    assert report.summary("x") == "x: no bad items in 10"


# ------------------------------------------------------------------------------ the one image probe


FULL_JPEG = coco_files.noise_jpeg_bytes(7)  # cut short, it keeps a valid header but its pixels don't decode
BAD_IMAGES = {
    "truncated JPEG": FULL_JPEG[: len(FULL_JPEG) * 6 // 10],
    "zero-byte file": b"",
    "text file named .jpg": b"just a line of text, not a JPEG\n",
}
# What each bad file raises when decoded: the shared probe gives every builder the same reason and error type.
ERROR_TYPE = {
    "truncated JPEG": "OSError",
    "zero-byte file": "UnidentifiedImageError",
    "text file named .jpg": "UnidentifiedImageError",
}


def test_probe_image_modes(tmp_path):
    truncated = BAD_IMAGES["truncated JPEG"]
    path = tmp_path / "ok.jpg"
    path.write_bytes(FULL_JPEG)
    for source in (path, str(path), FULL_JPEG, io.BytesIO(FULL_JPEG)):  # a path, bytes or a file object
        assert probe_image(source) is None and probe_image(source, draft=True) is None
    # A truncated JPEG has a valid header: only a decode (full or at 1/8 scale) finds it.
    assert probe_image(truncated, decode=False) is None
    for problem in (probe_image(truncated), probe_image(truncated, draft=True)):
        assert problem[0] == "unreadable image" and problem[1].startswith("OSError: image file is truncated")
    assert probe_image(b"", decode=False)[0] == "unreadable image"  # the header check catches non-images
    png = io.BytesIO()
    Image.new("RGB", (9, 9)).save(png, "PNG")
    assert probe_image(png.getvalue(), draft=True) is None  # draft is a no-op for non-JPEGs
    # No file behind the path (absent, a folder, a file used as a folder): "missing", with no detail.
    for missing in (tmp_path / "absent.jpg", tmp_path, path / "below-a-file.jpg"):
        assert probe_image(missing) == ("missing image", "")


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_every_builder_rejects_a_bad_image_the_same_way(tmp_path, kind):
    """load_image, COCO (verify_images) and Conceptual Captions (shards and image folders) share one probe."""
    data = BAD_IMAGES[kind]
    expected = rf"unreadable image \({ERROR_TYPE[kind]}: "

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data)
    report = BadDataReport()
    assert report.load_image(bad) is None and report.counts == {"unreadable image": 1}
    with pytest.raises(BadDataError, match=r"bad\.jpg: " + expected):
        BadDataReport(strict=True).load_image(bad)

    # COCO: image 203 is the bad one.
    coco_files.write_split(tmp_path / "val.json", tmp_path / "val2017", coco_files.VAL, folder="val2017")
    (tmp_path / "val2017" / "000000000203.jpg").write_bytes(data)
    args = {"annotations": {"validation": tmp_path / "val.json"}, "images": {"validation": tmp_path / "val2017"}}
    ds = build_coco_matching(**args, verify_images=True)["validation"]
    assert 203 not in ds["image_id"] and "1 unreadable image" in ds.info.description
    with pytest.raises(BadDataError, match=r"000000000203\.jpg: " + expected):
        build_coco_matching(**args, verify_images=True, strict=True)
    default = build_coco_matching(**args)["validation"]  # the default check decodes JPEGs at 1/8 scale
    assert 203 not in default["image_id"]

    # Conceptual Captions shards: row 1's image member is the bad one.
    shard = cc.write_tar(tmp_path / "00000.tar", [cc.sample(0), cc.sample(1, image=data), cc.sample(2)])
    assert [ex["key"] for ex in load_conceptual_captions(shards=shard, streaming=True)] == ["000000000", "000000002"]
    with pytest.raises(BadDataError, match=r"00000\.tar, key 000000001: " + expected):
        list(load_conceptual_captions(shards=shard, strict=True, streaming=True))

    # Conceptual Captions image folder: 1.jpg is the bad one (rows 2.. have no image: dead URLs).
    tsv, folder = cc.write_tsv(tmp_path / "cc.tsv"), tmp_path / "images"
    folder.mkdir()
    (folder / "0.jpg").write_bytes(cc.jpeg(0))
    (folder / "1.jpg").write_bytes(data)
    assert [ex["key"] for ex in load_conceptual_captions(tsv, image_dir=folder, streaming=True)] == ["000000000"]
    with pytest.raises(BadDataError, match=r"1\.jpg \(.*cc\.tsv line 3\): " + expected):
        list(load_conceptual_captions(tsv, image_dir=folder, strict=True, streaming=True))
