"""The teacher-embedding cache is never stale: images read by path are part of its key, so an image overwritten in
place (which keeps the dataset's fingerprint) is refused, naming the file -- also when size and time are kept."""

from __future__ import annotations

import io
import os

import datasets
import pytest
from PIL import Image

from mmkd.data.cache import StaleCacheError, cache_teacher_embeddings, image_files, load_cached_embeddings
from mmkd.data.conceptual_captions import load_conceptual_captions


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Conceptual Captions' ``image_dir`` layout: a TSV and one image file per row."""
    folder = tmp_path / "images"
    folder.mkdir()
    lines = ["caption\turl"]
    for row in range(6):
        (folder / f"{row}.jpg").write_bytes(jpeg((40 * row, 90, 160)))
        lines.append(f"a picture of square {row}\thttps://example.com/{row}.jpg")
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def load(root):
    return load_conceptual_captions(root / "cc.tsv", image_dir=root / "images", cache_dir=root / "arrow")


def test_an_image_overwritten_in_place_is_refused_naming_it(image_folder, open_clip_teacher):
    cache = image_folder / "teacher-cache"
    ds = load(image_folder)
    assert image_files(ds, "image") is not None  # the rows hold paths: the files are part of the key
    first = cache_teacher_embeddings(ds, open_clip_teacher, cache, batch_size=4)

    target = image_folder / "images" / "3.jpg"
    target.write_bytes(jpeg((250, 10, 10)))  # same name, other picture
    again = load(image_folder)
    assert again._fingerprint == ds._fingerprint  # the dataset does not see it ...
    with pytest.raises(StaleCacheError, match=rf"{target}.* changed since the cache was written"):
        cache_teacher_embeddings(again, open_clip_teacher, cache, batch_size=4)  # ... the cache does
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    with pytest.raises(StaleCacheError, match=str(target)):
        load_cached_embeddings(again, open_clip_teacher, entry)
    assert len(first) == len(ds)


def test_an_edit_that_keeps_size_and_time_is_caught_by_the_content_hash(image_folder, open_clip_teacher):
    cache = image_folder / "teacher-cache"
    cache_teacher_embeddings(load(image_folder), open_clip_teacher, cache, batch_size=4)
    target = image_folder / "images" / "1.jpg"
    stat, data = target.stat(), bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # one byte of the scan: same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    expected = rf"{target} changed since the cache was written \(same size and time, other content\)"
    with pytest.raises(StaleCacheError, match=expected):
        cache_teacher_embeddings(load(image_folder), open_clip_teacher, cache, batch_size=4)


def test_unchanged_files_reuse_the_cache_and_embedded_images_need_no_file_list(image_folder, open_clip_teacher):
    cache = image_folder / "teacher-cache"
    a = cache_teacher_embeddings(load(image_folder), open_clip_teacher, cache, batch_size=4)
    b = cache_teacher_embeddings(load(image_folder), open_clip_teacher, cache, batch_size=4)
    assert a["teacher_image_embeds"] == b["teacher_image_embeds"] and len(list(cache.iterdir())) == 1
    embedded = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8))], "text": ["x"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    assert image_files(embedded, "image") is None  # bytes in the table: the fingerprint covers them


def test_a_rewritten_shard_changes_the_fingerprint_even_with_size_and_time_kept(tmp_path):
    """Webdataset shards are copied into the Arrow cache; their signature (and so the dataset's fingerprint and the
    teacher cache's key) covers a hash of each shard's first and last 64 KiB besides size and time."""
    from mmkd.data.conceptual_captions import _file_signature

    shard = tmp_path / "00000.tar"
    shard.write_bytes(b"a" * 300_000)
    before, stat = _file_signature(str(shard)), shard.stat()
    shard.write_bytes(b"a" * 299_999 + b"b")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = _file_signature(str(shard))
    assert before[:3] == after[:3] and before[3] != after[3]
