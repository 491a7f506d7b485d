"""One bad-item policy everywhere: 1 % bad rows (a truncated JPEG, a zero-byte file, a text file named .jpg, a
missing path, a caption that is not text) are skipped and counted exactly, and the run -- and the teacher cache
built over the same rows -- completes."""

from __future__ import annotations

import io
import json
import logging

import datasets
import pytest
from PIL import Image

from mmkd.data.baddata import BadDataError, drop_bad_rows
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"


def jpeg_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (i % 250, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def bad_rows(root, n: int = 500, missing: bool = True):
    """``n`` rows over image files on disk (an ``Image`` column over paths), 1 % of them bad in the five ways of the
    issue (without ``missing`` the fourth is an empty caption: ``save_to_disk`` embeds the files and refuses a
    missing one)."""
    images = root / "images"
    images.mkdir(parents=True)
    paths, texts = [], []
    for i in range(n):
        path = images / f"{i:04d}.jpg"
        path.write_bytes(jpeg_bytes(i))
        paths.append(str(path))
        texts.append(f"a photo number {i}")
    step = n // 5
    (images / f"{0 * step:04d}.jpg").write_bytes(jpeg_bytes(0)[:200])  # truncated JPEG
    (images / f"{1 * step:04d}.jpg").write_bytes(b"")  # zero-byte file
    (images / f"{2 * step:04d}.jpg").write_text("not an image at all")  # a text file named .jpg
    if missing:
        paths[3 * step] = str(images / "gone.jpg")  # a missing path
    else:
        texts[3 * step] = "   "  # an empty caption
    texts[4 * step] = None  # a caption that is not text
    return datasets.Dataset.from_dict({"image": paths, "text": texts}).cast_column("image", datasets.Image())


def bad_folder(root, n: int = 500):
    """The same rows written by ``save_to_disk``: what ``--dataset_name <folder>`` reads."""
    folder = root / "saved"
    bad_rows(root, n, missing=False).save_to_disk(str(folder))
    return folder


def test_drop_bad_rows_counts_exactly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmkd.data.baddata"):
        kept = drop_bad_rows(bad_rows(tmp_path), "image", "text", what="planted")
    assert len(kept) == 495
    assert "planted: skipped 5 of 500 items (3 unreadable image, 1 missing image, 1 bad caption)" in caplog.text
    assert all(isinstance(t, str) and t.strip() for t in kept["text"])
    kept[0]["image"].load()  # the image column decodes again
    with pytest.raises(BadDataError, match="planted row 0 .*unreadable image"):
        drop_bad_rows(bad_rows(tmp_path / "again"), "image", "text", what="planted", strict=True)


def test_a_saved_folder_is_checked_the_same_way(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmkd.data.baddata"):
        kept = drop_bad_rows(datasets.load_from_disk(str(bad_folder(tmp_path))), "image", "text", what="saved")
    assert len(kept) == 495 and "saved: skipped 5 of 500 items (3 unreadable image, 2 bad caption)" in caplog.text


def test_a_stream_skips_and_counts_as_it_goes(tmp_path, caplog):
    stream = bad_rows(tmp_path, n=100).to_iterable_dataset()
    with caplog.at_level(logging.WARNING, logger="mmkd.data.baddata"):
        rows = list(drop_bad_rows(stream, "image", "text", what="stream"))
    assert len(rows) == 95 and "skipped stream example 0: unreadable image" in caplog.text


def test_training_and_the_teacher_cache_complete_over_one_percent_bad_rows(tmp_path, caplog):
    folder = bad_folder(tmp_path)
    recipe, out = load_recipe("clip_student"), tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mmkd.data.baddata"):
        summary = recipe.main(["--config", str(SMOKE), "--dataset_name", str(folder), "--output_dir", str(out),
                               "--per_device_train_batch_size", "16", "--max_steps", "3", "--save_strategy", "no",
                               "--report_to", "none", "--use_cpu", "true", "--teacher_cache_dir",
                               str(tmp_path / "cache")])
    assert summary["global_step"] == 3 and summary["teacher_embeddings"] == "cached"
    assert "skipped 5 of 500 items" in caplog.text
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 3


def test_a_wrong_column_is_named_not_reported_as_bad_data(tmp_path):
    from mmkd.checks import ConfigError

    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / f"{i}.jpg") for i in range(4)], "text": ["a"] * 4})
    rows = rows.cast_column("image", datasets.Image())  # paths to files that were never written
    with pytest.raises(ConfigError, match="image_column=image, text_column=text: every one of the 4 rows"):
        drop_bad_rows(rows, "image", "text", what="typo")
