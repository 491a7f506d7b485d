"""mmkd.data.sidecars: per-shard teacher sidecars for webdataset shards, and the stream that reads them."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import pytest
import torch
from PIL import Image

from mmkd.data.cache import IMAGE_COLUMN, TEXT_COLUMN, StaleCacheError
from mmkd.data.sidecars import (
    VIEW_COLUMN,
    ViewSpec,
    apply_view,
    build_sidecars,
    sidecar_path,
    stream_with_sidecars,
    view_params,
)
from tests.conftest import TINY_OPEN_CLIP_CONFIG


def write_shard(path, start, n, size=(60, 44)):
    """A webdataset shard as img2dataset writes it, with real JPEGs of distinct content."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            image = Image.new("RGB", size, (37 * i % 256, 90, 200 - 11 * i % 200))
            image.paste((255, 255, 0), (i % 30, 5, i % 30 + 12, 25))  # an off-centre patch: crops differ
            image.save(buf, format="JPEG", quality=95)
            for ext, data in {"jpg": buf.getvalue(), "txt": f"caption {i}".encode(),
                              "json": json.dumps({"key": key}).encode()}.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(3):
        write_shard(root / f"{s:05d}.tar", 4 * s, 4)
    return root


def load(seed=0):
    from mmkd.teachers import load_teacher

    torch.manual_seed(seed)
    return load_teacher(str(TINY_OPEN_CLIP_CONFIG), pretrained=None)


@pytest.fixture(scope="module")
def teacher():
    return load()


def _decode(row):
    image = row["image"]
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"])).convert("RGB")


def test_sidecars_hold_the_teachers_embeddings_and_are_reused(shards, teacher, tmp_path):
    out = tmp_path / "sidecars"
    counts = build_sidecars(shards, teacher, out, batch_size=3)
    assert counts == {"shards": 3, "built": 3, "reused": 0, "samples": 12}
    assert sorted(p.name for p in out.iterdir()) == [f"{s:05d}.tar.teacher.safetensors" for s in range(3)]
    rows = list(stream_with_sidecars(shards, teacher, out))
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(12)]
    inputs = teacher.inputs()
    images = torch.stack([teacher.encode_image(inputs.images([_decode(r)]))[0] for r in rows])
    texts = teacher.encode_text(inputs.texts([r["text"] for r in rows])["input_ids"])
    torch.testing.assert_close(torch.tensor([r[IMAGE_COLUMN] for r in rows]), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([r[TEXT_COLUMN] for r in rows]), texts, atol=1e-5, rtol=0)
    again = build_sidecars(shards, teacher, out)
    assert again == {"shards": 3, "built": 0, "reused": 3, "samples": 0}


def test_a_killed_build_resumes_at_the_missing_shards(shards, teacher, tmp_path, monkeypatch):
    """A kill inside a sidecar write leaves only a temporary file: the re-run rebuilds that shard, keeps the done
    ones (untouched), and a torn file at the final name is never trusted."""
    import safetensors.torch

    out = tmp_path / "sidecars"
    real_save = safetensors.torch.save_file
    calls = []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:
                f.write(b"half a sidecar")
            raise KeyboardInterrupt  # the kill, mid-write of the second shard
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build_sidecars(shards, teacher, out)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    first = sidecar_path(shards / "00000.tar", out)
    assert first.is_file() and not sidecar_path(shards / "00001.tar", out).exists()
    stamp = first.stat().st_mtime_ns
    sidecar_path(shards / "00002.tar", out).write_bytes(b"torn")  # garbage at a final name: rebuilt
    with pytest.raises(StaleCacheError, match=r"00001\.tar.*no readable teacher sidecar"):
        stream_with_sidecars(shards, teacher, out)  # refused before any training, naming the first missing one
    with pytest.raises(StaleCacheError, match=r"00002\.tar.*no readable teacher sidecar"):
        stream_with_sidecars([shards / "00000.tar", shards / "00002.tar"], teacher, out)  # and the torn one
    counts = build_sidecars(shards, teacher, out)
    assert counts["built"] == 2 and counts["reused"] == 1 and first.stat().st_mtime_ns == stamp
    assert len(list(stream_with_sidecars(shards, teacher, out))) == 12
    for leftover in out.glob("*.tmp-*"):
        os.remove(leftover)  # the killed write's temporary file is the only other thing there
    assert len(list(out.iterdir())) == 3


def test_stale_sidecars_are_refused_naming_the_shard_and_what_differs(shards, teacher, tmp_path):
    out = tmp_path / "sidecars"
    build_sidecars(shards, teacher, out)
    with pytest.raises(StaleCacheError, match="teacher_weights_sha256"):
        stream_with_sidecars(shards, load(seed=1), out)  # another teacher
    with pytest.raises(StaleCacheError, match="views"):
        stream_with_sidecars(shards, teacher, out, spec=ViewSpec(views=2))
    with pytest.raises(StaleCacheError, match="views"):
        build_sidecars(shards, teacher, out, spec=ViewSpec(views=2))  # a build never overwrites another key
    tar = shards / "00000.tar"
    stat, data = tar.stat(), bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # one byte of the first sample's JPEG, same size, the modification time put back
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(StaleCacheError, match=r"00000\.tar.*ends_sha256"):
        stream_with_sidecars(shards, teacher, out)
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_shard(shards / "00001.tar", 100, 4)  # the tar rewritten in place
    with pytest.raises(StaleCacheError, match=r"00001\.tar.*shard"):
        stream_with_sidecars(shards, teacher, out)
    with pytest.raises(StaleCacheError, match="00001.tar"):
        build_sidecars(shards, teacher, out)


def test_augmented_views_give_the_student_exactly_the_teachers_pixels(shards, teacher, tmp_path):
    """K = 3 views per image: every streamed row's embedding is the teacher's of the view named in its row, the
    collator cuts that same view for the student, and the views differ between epochs (the loader's RNG)."""
    from transformers import CLIPImageProcessor, CLIPTokenizerFast

    from mmkd.data import CLIPDistillationCollator

    spec = ViewSpec(views=3, seed=5)
    out = tmp_path / "sidecars"
    build_sidecars(shards, teacher, out, spec=spec, batch_size=4)
    stream = stream_with_sidecars(shards, teacher, out, spec=spec)
    torch.manual_seed(0)
    rows = list(stream)
    inputs = teacher.inputs()
    size = inputs.images([Image.new("RGB", (8, 8))]).shape[-1]
    for row in rows:
        image = _decode(row)
        top, left, h, w, flip, view_size = row[VIEW_COLUMN]
        assert view_size == size and [top, left, h, w, flip] in view_params(row["key"], spec, *image.size)
        expected = teacher.encode_image(inputs.images([apply_view(image, row[VIEW_COLUMN])]))[0]
        torch.testing.assert_close(torch.tensor(row[IMAGE_COLUMN]), expected, atol=1e-5, rtol=0)
    assert len({tuple(v) for r in rows for v in view_params(r["key"], spec, *_decode(r).size)}) > 12  # views vary
    torch.manual_seed(1)
    other_epoch = [r[VIEW_COLUMN] for r in stream]
    assert other_epoch != [r[VIEW_COLUMN] for r in rows]

    processor = teacher.transformers_processor()
    assert isinstance(processor.image_processor, CLIPImageProcessor)
    assert isinstance(processor.tokenizer, CLIPTokenizerFast)
    collator = CLIPDistillationCollator(processor)
    examples = [{"image": _decode(r), **{k: v for k, v in r.items() if k != "image"}} for r in rows[:4]]
    batch = collator(examples)
    views = [apply_view(ex["image"], ex[VIEW_COLUMN]) for ex in examples]
    torch.testing.assert_close(batch["pixel_values"], processor(images=views, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(batch[IMAGE_COLUMN], torch.tensor([r[IMAGE_COLUMN] for r in rows[:4]]))


def test_the_trainer_trains_from_the_sidecar_stream_without_a_teacher(shards, teacher, tmp_path):
    from mmkd.data import CLIPDistillationCollator
    from mmkd.students import build_student
    from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer

    out = tmp_path / "sidecars"
    build_sidecars(shards, teacher, out)
    stream = stream_with_sidecars(shards, teacher, out)
    student, _ = build_student(teacher.to_transformers(), strategy="every_other", seed=0)
    args = CLIPDistillationConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                                  triplet_weight=0, image_distill_weight=1.0, text_distill_weight=1.0,
                                  contrastive_weight=1.0, affinity_weight=1.0, seed=0)
    collator = CLIPDistillationCollator(teacher.transformers_processor())
    trainer = CLIPDistillationTrainer(model=student, teacher=None, args=args, train_dataset=stream,
                                      data_collator=collator)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss_image_mse" in row]
    assert trainer.state.global_step == 3 and len(logged) == 3 and all(r["loss_affinity"] > 0 for r in logged)


def test_the_recipe_builds_sidecars_and_trains_from_them(shards, tmp_path, capsys):
    from tests.conftest import REPO, load_recipe

    recipe = load_recipe("clip_student")
    smoke = str(REPO / "recipes" / "configs" / "smoke.yaml")
    common = ["--config", smoke, "--output_dir", str(tmp_path / "run"), "--dataset_name", "conceptual_captions",
              "--data_dir", str(shards), "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
              "--per_device_train_batch_size", "4", "--max_steps", "2"]
    for extra, message in ((["--streaming", "true", "--teacher_views", "2"], "teacher_views=2: .*teacher_sidecar_dir"),
                           (["--teacher_sidecar_dir", str(tmp_path / "sc")], "teacher_sidecar_dir=.*streaming=true")):
        with pytest.raises(SystemExit) as exit_info:
            recipe.main([*common, *extra])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "sc").exists()  # refused before anything was written
    summary = recipe.main([*common, "--streaming", "true", "--teacher_sidecar_dir", str(tmp_path / "sc"),
                           "--teacher_views", "2"])
    assert summary["teacher_embeddings"] == "sidecars" and summary["global_step"] == 2
    assert len(list((tmp_path / "sc").glob("*.teacher.safetensors"))) == 3


def _build_on_rank(rank, port, shards, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class Rank:  # what build_sidecars reads of an accelerate PartialState
        process_index, num_processes, device = rank, 2, torch.device("cpu")

        @staticmethod
        def wait_for_everyone():
            dist.barrier()

    try:
        counts = build_sidecars(shards, load(), out, accelerator=Rank())
        (out.parent / f"rank{rank}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def test_two_real_processes_build_the_sidecars_in_parallel(shards, teacher, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sidecars"
    mp.spawn(_build_on_rank, args=(port, shards, out), nprocs=2, join=True)
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [c["built"] for c in counts] == [2, 1] and sum(c["samples"] for c in counts) == 12
    assert sorted(p.name for p in out.iterdir()) == [f"{s:05d}.tar.teacher.safetensors" for s in range(3)]
    assert len(list(stream_with_sidecars(shards, teacher, out))) == 12  # one process's teacher reads them all
