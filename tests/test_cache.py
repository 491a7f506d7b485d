"""Teacher-embedding cache: hit, miss, staleness, resume after an interruption, and training from the cache."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmkd.data import CLIPDistillationCollator
from mmkd.data.cache import (
    IMAGE_COLUMN,
    TEXT_COLUMN,
    StaleCacheError,
    cache_teacher_embeddings,
    load_cached_embeddings,
)


class CountingTeacher:
    """Wraps a teacher's encoders to count calls (and optionally fail on the n-th image batch)."""

    def __init__(self, teacher, fail_on_batch: int | None = None):
        self.teacher, self.calls, self.fail_on_batch = teacher, 0, fail_on_batch
        self._encode_image = teacher.encode_image

    def __enter__(self):
        def encode_image(px, normalize=False):
            self.calls += 1
            if self.fail_on_batch is not None and self.calls == self.fail_on_batch:
                raise KeyboardInterrupt("simulated interruption")
            return self._encode_image(px, normalize)

        self.teacher.encode_image = encode_image
        return self

    def __exit__(self, *exc):
        del self.teacher.encode_image
        return False


def test_cache_hit_miss_and_exact_values(tmp_path, open_clip_teacher, shapes):
    rows = shapes.select(range(10))
    with CountingTeacher(open_clip_teacher) as counter:
        cached = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path, batch_size=4, shard_size=6)
        assert counter.calls == 3  # shards of 6 + 4 rows, batches of 4: 2 + 1
        again = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path, batch_size=4, shard_size=6)
        assert counter.calls == 3  # a hit: the teacher did not run
    assert cached.column_names == [*rows.column_names, IMAGE_COLUMN, TEXT_COLUMN]
    inputs = open_clip_teacher.inputs()
    ref_img = open_clip_teacher.encode_image(inputs.images(rows["image"]))
    ref_txt = open_clip_teacher.encode_text(**inputs.texts(rows["text"]))
    torch.testing.assert_close(torch.tensor(cached[IMAGE_COLUMN]), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(again[TEXT_COLUMN]), ref_txt, atol=1e-5, rtol=1e-5)
    # A different dataset is a miss: a new cache entry beside the first.
    cache_teacher_embeddings(shapes.select(range(10, 14)), open_clip_teacher, tmp_path, batch_size=4)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_stale_cache_is_refused_naming_what_changed(tmp_path, open_clip_teacher, shapes):
    rows = shapes.select(range(6))
    cache_teacher_embeddings(rows, open_clip_teacher, tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert load_cached_embeddings(rows, open_clip_teacher, entry).num_rows == 6
    changed = copy.deepcopy(open_clip_teacher)
    with torch.no_grad():
        changed.model.visual.proj.add_(0.01)
    with pytest.raises(StaleCacheError, match="teacher_weights_sha256"):
        load_cached_embeddings(rows, changed, entry)
    with pytest.raises(StaleCacheError, match="dataset_fingerprint"):
        load_cached_embeddings(shapes.select(range(1, 7)), open_clip_teacher, entry)
    with pytest.raises(StaleCacheError, match="no mmkd_cache.json"):
        load_cached_embeddings(rows, open_clip_teacher, tmp_path)


def test_interrupted_run_resumes_and_leaves_no_complete_looking_cache(tmp_path, open_clip_teacher, shapes):
    rows = shapes.select(range(12))
    with CountingTeacher(open_clip_teacher, fail_on_batch=3) as counter, pytest.raises(KeyboardInterrupt):
        cache_teacher_embeddings(rows, open_clip_teacher, tmp_path, batch_size=4, shard_size=4)
    assert counter.calls == 3
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert all(name.endswith(".work") for name in entries), entries  # only the work folder, no final cache
    (work,) = tmp_path.iterdir()
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["shard-00000", "shard-00001"]
    with CountingTeacher(open_clip_teacher) as counter:
        cached = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path, batch_size=4, shard_size=4)
    assert counter.calls == 1  # only the third shard was computed
    assert cached.num_rows == 12 and not work.exists()
    full = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path / "fresh", batch_size=4, shard_size=4)
    torch.testing.assert_close(torch.tensor(cached[IMAGE_COLUMN]), torch.tensor(full[IMAGE_COLUMN]))


def test_a_torn_or_foreign_work_folder_is_cleared_not_trusted(tmp_path, open_clip_teacher, shapes):
    """What a kill can leave in the work folder besides finished shards: a key file cut mid-write, no key file, or
    another run's key. Such shards are never reused (their images are unknown): every shard is computed again and
    the cache equals an uninterrupted run's."""
    rows = shapes.select(range(8))
    reference = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path / "reference", batch_size=4, shard_size=4)
    for damage in ("torn", "missing", "foreign"):
        root = tmp_path / damage
        with CountingTeacher(open_clip_teacher, fail_on_batch=2), pytest.raises(KeyboardInterrupt):
            cache_teacher_embeddings(rows, open_clip_teacher, root, batch_size=4, shard_size=4)
        (work,) = root.iterdir()
        (key_file,) = [p for p in work.iterdir() if p.is_file()]
        assert (work / "shard-00000").is_dir() and json.loads(key_file.read_text())
        if damage == "torn":
            key_file.write_text(key_file.read_text()[:25])
        elif damage == "missing":
            key_file.unlink()
        else:
            key_file.write_text(json.dumps({"teacher": "another"}))
        with CountingTeacher(open_clip_teacher) as counter:
            cached = cache_teacher_embeddings(rows, open_clip_teacher, root, batch_size=4, shard_size=4)
        assert counter.calls == 2, damage  # both shards: the interrupted run's first shard was not trusted
        torch.testing.assert_close(torch.tensor(cached[IMAGE_COLUMN]), torch.tensor(reference[IMAGE_COLUMN]))
        assert not work.exists() and [p.name for p in root.iterdir()] == [work.name.removesuffix(".work")]


def test_bad_arguments(tmp_path, open_clip_teacher, shapes):
    with pytest.raises(ValueError, match="'caption'"):
        cache_teacher_embeddings(shapes, open_clip_teacher, tmp_path, text_column="caption")
    with pytest.raises(ValueError, match="shard_size"):
        cache_teacher_embeddings(shapes, open_clip_teacher, tmp_path, shard_size=0)


def test_training_from_the_cache_never_runs_the_teacher(tmp_path, open_clip_teacher, shapes):
    from mmkd.students import build_student
    from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer

    rows = shapes.select(range(16))
    cached = cache_teacher_embeddings(rows, open_clip_teacher, tmp_path / "cache")
    student, _ = build_student(open_clip_teacher.to_transformers())
    processor = open_clip_teacher.transformers_processor()
    args = CLIPDistillationConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, report_to="none",
        use_cpu=True, save_strategy="no", affinity_weight=0.5, logging_steps=1,
    )
    before = student.visual_projection.weight.detach().clone()
    with CountingTeacher(open_clip_teacher) as counter:
        trainer = CLIPDistillationTrainer(
            model=student, teacher=None, args=args, train_dataset=cached,
            data_collator=CLIPDistillationCollator(processor, open_clip_teacher.inputs()),
        )
        trainer.train()
    assert counter.calls == 0 and trainer.state.global_step == 2
    assert not torch.equal(before, trainer.model.visual_projection.weight)
    assert any("loss_image_mse" in e for e in trainer.state.log_history)
