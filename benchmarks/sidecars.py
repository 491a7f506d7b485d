"""Teacher sidecars on a generated webdataset: build speed against a bare teacher forward, and training from shards +
sidecars against training with no teacher at all.

Writes ``--shards`` tar shards of ``--per-shard`` JPEG images (``--image-size`` px, coloured shapes with a caption,
img2dataset's layout), then, in one process, one after the other:

1. **bare teacher forward**: the same reader (the bad-row filter, JPEG decode), the teacher's preprocessing and
   its image and text forward over every sample, in batches of ``--batch-size``, nothing written;
2. **sidecar build**: ``build_sidecars`` over the same shards (the same work plus writing one safetensors file
   per shard), between two bare passes; target images/s >= 0.9x the faster bare pass;
3. **training**: ``CLIPDistillationTrainer`` on ``stream_with_sidecars`` (embedding MSE + cosine, contrastive and
   affinity terms, no teacher in memory) against the same trainer on the plain shard stream
   (``load_conceptual_captions(..., streaming=True)``, contrastive only, no teacher); ``--warmup`` steps discarded,
   then ``--steps`` timed, ``--rounds`` interleaved rounds in alternating order; target samples/s >= 0.95x the
   no-teacher run.

The teacher is a random open_clip model (``--width`` wide, ``--layers`` + ``--layers`` deep, patch 16 at the
teacher's ``--teacher-size``) and the student its half-depth ``CLIPModel``: big enough that the forward, not Python,
is the cost; small enough to embed 20k images on 2 CPU cores in a few minutes.

    python benchmarks/sidecars.py --output sidecars.json                  # 20 shards x 1000 images
    python benchmarks/sidecars.py --shards 2 --per-shard 64 --steps 3     # smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def write_shards(root: Path, shards: int, per_shard: int, size: int) -> list[str]:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    paths = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s * per_shard + i:09d}"
                c = rng.integers(0, len(colours))
                image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
                x, y = (int(v) for v in rng.integers(0, size // 2, 2))
                ImageDraw.Draw(image).ellipse([x, y, x + size // 2, y + size // 2], fill=colours[c])
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                members = {"jpg": buf.getvalue(), "txt": f"a {colours[c]} circle on a plain background".encode(),
                           "json": json.dumps({"key": key}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def bare_forward(shards: list[str], teacher, batch_size: int) -> int:
    from mmkd.data.baddata import BadDataReport
    from mmkd.data.sidecars import _decode, _embed_images, _embed_texts, _samples

    inputs, n, pending = teacher.inputs(), 0, []

    def flush():
        _embed_images(teacher, inputs, [img for img, _ in pending], teacher.device)
        _embed_texts(teacher, inputs, [t for _, t in pending], teacher.device)
        pending.clear()

    report = BadDataReport()
    for shard in shards:  # per shard, as the builder batches
        for row in _samples(shard, report):
            pending.append((_decode(row), row["text"]))
            n += 1
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    return n


def train(stream, student, processor, steps: int, batch_size: int, workdir: Path, name: str, **loss) -> list[float]:
    from transformers import PrinterCallback, TrainerCallback

    from mmkd.data import CLIPDistillationCollator
    from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer

    class StepTimer(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    args = CLIPDistillationConfig(output_dir=str(workdir / name), per_device_train_batch_size=batch_size,
                                  max_steps=steps, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                                  disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0, seed=0,
                                  triplet_weight=0.0, **loss)
    timer = StepTimer()
    trainer = CLIPDistillationTrainer(model=student, teacher=None, args=args, train_dataset=stream,
                                      data_collator=CLIPDistillationCollator(processor), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="side of the generated JPEGs")
    p.add_argument("--teacher-size", type=int, default=96, help="the teacher's (and student's) input resolution")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch (build and bare forward)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--rounds", type=int, default=2, help="interleaved training rounds of both configurations")
    p.add_argument("--views", type=int, default=0, help="augmented views per image in the sidecars")
    p.add_argument("--workdir", default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args()

    from mmkd.data import load_conceptual_captions
    from mmkd.data.sidecars import ViewSpec, build_sidecars, stream_with_sidecars
    from mmkd.students import build_student
    from mmkd.teachers import load_teacher

    tmp = tempfile.TemporaryDirectory(prefix="mmkd-sidecars-") if args.workdir is None else None
    workdir = Path(tmp.name if tmp else args.workdir)
    (workdir / "shards").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    shards = write_shards(workdir / "shards", args.shards, args.per_shard, args.image_size)
    print(f"{len(shards)} shards x {args.per_shard} images written in {time.perf_counter() - t0:.1f} s", flush=True)

    config = {"embed_dim": args.width,
              "vision_cfg": {"image_size": args.teacher_size, "layers": args.layers, "width": args.width,
                             "head_width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": args.width, "heads": args.width // 64,
                           "layers": args.layers}}
    (workdir / "teacher.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    teacher = load_teacher(str(workdir / "teacher.json"), pretrained=None)
    total = args.shards * args.per_shard

    # bare, build, bare: the host's speed drifts, so the build is compared with the faster of the two bare passes
    spec = ViewSpec(views=args.views)
    bare_runs, n, build = [], total, None
    for when in ("before", "after"):
        if when == "after":
            t0 = time.perf_counter()
            counts = build_sidecars(shards, teacher, workdir / "sidecars", spec=spec, batch_size=args.batch_size)
            build = time.perf_counter() - t0
            assert counts["samples"] == n == total, counts
            print(f"sidecar build: {n} images ({max(1, args.views)} view(s) each) in {build:.1f} s = "
                  f"{n / build:.1f} images/s", flush=True)
        t0 = time.perf_counter()
        n = bare_forward(shards, teacher, args.batch_size)
        bare_runs.append(time.perf_counter() - t0)
        print(f"bare teacher forward ({when} the build): {n} images in {bare_runs[-1]:.1f} s = "
              f"{n / bare_runs[-1]:.1f} images/s", flush=True)
    bare = min(bare_runs)
    print(f"sidecar build / faster bare forward = {bare / build:.3f} (target >= 0.9)", flush=True)

    processor = teacher.transformers_processor()
    full = teacher.to_transformers()
    steps = args.warmup + args.steps
    configs = {
        "sidecars": (lambda: stream_with_sidecars(shards, teacher, workdir / "sidecars", spec=spec),
                     {"image_distill_weight": 1.0, "text_distill_weight": 1.0, "contrastive_weight": 1.0,
                      "affinity_weight": 1.0}),
        "no_teacher": (lambda: load_conceptual_captions(None, shards=shards, streaming=True),
                       {"image_distill_weight": 0.0, "text_distill_weight": 0.0, "contrastive_weight": 1.0,
                        "affinity_weight": 0.0}),
    }
    results = {name: {"steps": []} for name in configs}
    for round_ in range(args.rounds):  # interleaved, alternating the order: drift hits both sides alike
        order = list(configs) if round_ % 2 == 0 else list(configs)[::-1]
        for name in order:
            make_stream, loss = configs[name]
            student, _ = build_student(full, strategy="every_other", seed=0)
            times = train(make_stream(), student, processor, steps, args.train_batch, workdir, name, **loss)
            results[name]["steps"] += times[args.warmup:]
            print(f"training round {round_ + 1}, {name}: {args.train_batch * args.steps / sum(times[args.warmup:]):.1f}"
                  " samples/s", flush=True)
    for name, r in results.items():
        r["samples_per_s"] = args.train_batch * len(r["steps"]) / sum(r["steps"])
        r["s_per_step_median"] = sorted(r["steps"])[len(r["steps"]) // 2]
        print(f"training, {name}: {r['samples_per_s']:.1f} samples/s (median {r['s_per_step_median']:.3f} s/step)")
    ratio = results["sidecars"]["samples_per_s"] / results["no_teacher"]["samples_per_s"]
    print(f"training from sidecars / no teacher = {ratio:.3f} (target >= 0.95)")

    if args.output:
        Path(args.output).write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch_threads": torch.get_num_threads(),
            "args": vars(args), "images": n, "bare_forward_s": bare_runs, "build_s": build,
            "build_vs_bare": bare / build, "training": results, "training_ratio": ratio}, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
