"""Training throughput (samples/s): mmkd's distillation trainer vs open_clip_train's own distillation, in one run.

Configurations, trained one after the other on the same images and captions, with the same batch size, precision
(fp32), data-loader workers, thread count and machine:

1. ``open_clip_train --distill-model``: open_clip's own training script (from the open_clip_torch wheel) distilling
   the teacher (ViT-B-32 by default, random weights saved to a local checkpoint) into a half-depth student (same
   widths, half the layers per tower; a JSON model config registered with ``open_clip.add_model_config``).
   Loss: CLIP contrastive + open_clip's logit distillation (``DistillClipLoss``). Throughput is parsed from its own
   per-step log (``--log-every-n-steps 1``: ``Batch (t): ..., <samples/s>/s``).
2. mmkd, live teacher: ``CLIPDistillationTrainer`` with the open_clip teacher run on every batch and the half-depth
   ``transformers.CLIPModel`` student from ``build_student(..., strategy="every_other")``.
3. mmkd, cached teacher: the teacher's embeddings computed once by ``cache_teacher_embeddings`` (the one-off cost
   is timed and reported apart), then the same student trained with ``teacher=None`` from the cached columns.
4. mmkd, no teacher: the same student, contrastive loss only (no teacher term) - the limit of any distillation.
5. (reference) ``open_clip_train`` without ``--distill-model``: the same half-depth student alone.

mmkd's loss in 2 and 3 is CLIP contrastive + CLIP-KD affinity distillation + per-tower embedding distillation
(MSE + cosine), every weight 1, triplet 0: a superset of open_clip's (contrastive + logit distillation). The loss
math is negligible next to the towers' forward and backward passes.

Steps are timed end to end (data loading, forward, backward, optimizer step): open_clip_train's ``batch_time`` per
step, mmkd's interval between consecutive ``on_step_end`` callbacks. The first ``--warmup-steps`` of each run are
discarded; samples/s = batch size x timed steps / their total time.

    python benchmarks/train_throughput.py                           # ViT-B-32, batch 32, 3 warm-up + 10 timed
    python benchmarks/train_throughput.py --tiny --steps 2 --warmup-steps 1 --batch-size 8      # smoke test
    python benchmarks/train_throughput.py --model path/to/open_clip_config.json --output results.json

Fairness notes: both sides read the same PNG files from disk (open_clip_train through a CSV, mmkd through a
``datasets`` ``Image`` column over the same paths); open_clip_train runs in a subprocess with CPU only, no DDP, no
checkpoint saving (``--logs none``) and no reporting; neither side clips gradients (open_clip's default; mmkd is
run with ``max_grad_norm=0``); both use AdamW. Differences that remain are the implementations': open_clip pads
every caption to the full context length (77 tokens) in both towers of both models, mmkd's collator pads to the
longest caption in the batch and its open_clip teacher runs its causal text tower on that length too; open_clip's training transform is a random resized crop, mmkd's the teacher's
resize + centre crop. Needs the ``bench`` extra (open_clip_train imports webdataset and braceexpand).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmkd.reporting.tables import markdown_table
from mmkd.reporting.timing import time_summary

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "recipes" / "configs" / "tiny_openclip_vit.json"

# Runs open_clip_train's main() after registering the benchmark's model configs (argv[1] is the config folder).
OPEN_CLIP_WRAPPER = (
    "import sys, torch, open_clip\n"
    "open_clip.add_model_config(sys.argv[1])\n"
    "print(f'BENCH_THREADS={torch.get_num_threads()}', flush=True)\n"
    "from open_clip_train.main import main\n"
    "rc = main(sys.argv[2:])\n"
    "sys.exit(0 if rc is None else rc)\n"
)
# Environment variables that would make open_clip_train think it is one rank of a distributed launch.
DIST_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "PMI_SIZE",
    "PMI_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MASTER_ADDR",
    "MASTER_PORT",
)
SPS_RE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.eE+-]+)/s,")


# -- models and data ---------------------------------------------------------------------------------------------
def model_config(model: str) -> tuple[str, dict]:
    """(open_clip model name, config dict) of an open_clip model name or a JSON model config path."""
    import open_clip

    if model.endswith(".json"):
        return Path(model).stem, json.loads(Path(model).read_text())
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise SystemExit(f"open_clip has no model config {model!r}")
    return model, copy.deepcopy(cfg)


def half_depth_config(cfg: dict) -> dict:
    """The teacher's config with half the layers per tower (rounded up), as mmkd's default student."""
    out = copy.deepcopy(cfg)
    for tower in ("vision_cfg", "text_cfg"):
        out[tower]["layers"] = math.ceil(int(cfg[tower]["layers"]) / 2)
    return out


def write_data(root: Path, n: int, image_size: int, seed: int = 0) -> tuple[list[str], list[str], Path]:
    """n deterministic RGB shape images as PNG files with captions, plus open_clip_train's tab-separated CSV."""
    from mmkd.data.shapes import shapes_dataset

    ds = shapes_dataset(n, image_size=image_size, seed=seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths, texts = [], []
    for i, ex in enumerate(ds):
        path = img_dir / f"{i:05d}.png"
        ex["image"].save(path)
        paths.append(str(path))
        texts.append(ex["text"])
    csv = root / "train.csv"
    with open(csv, "w") as f:
        f.write("filepath\ttitle\n")
        for p, t in zip(paths, texts, strict=True):
            f.write(f"{p}\t{t}\n")
    return paths, texts, csv


def summarise(step_times: list[float], warmup: int, batch_size: int) -> dict:
    """The figures of one run's step times, the first ``warmup`` discarded (:func:`mmkd.reporting.timing.time_summary`):
    mean and median rates, and the timed steps over 1.5x the median (another process most likely took the CPU)."""
    timed = step_times[warmup:]
    if not timed:
        raise RuntimeError(
            f"only {len(step_times)} steps were recorded; none left after {warmup} warm-up steps"
        )
    summary = time_summary(timed, batch_size, disturbed_above=1.5)
    return {
        "samples_per_s": summary["per_s"],
        "s_per_step": summary["mean_s"],
        "median_s_per_step": summary["median_s"],
        "samples_per_s_at_median_step": summary["per_s_at_median"],
        "timed_steps": summary["count"],
        "disturbed_steps": summary["disturbed"],
        "step_times_s": [round(t, 4) for t in step_times],
    }


# -- open_clip_train ---------------------------------------------------------------------------------------------
def run_open_clip(
    name: str, workdir: Path, config_dir: Path, student: str, csv: Path, args, distill: tuple[str, str] | None
) -> dict:
    n_steps = args.warmup_steps + args.steps
    argv = [
        "--model", student, "--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--train-num-samples", str(n_steps * args.batch_size),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
        "--precision", "fp32", "--device", "cpu", "--log-every-n-steps", "1", "--report-to", "",
        "--logs", "none", "--name", name, "--seed", "0", "--warmup", "1",
    ]  # fmt: skip
    if distill is not None:
        argv += ["--distill-model", distill[0], "--distill-pretrained", distill[1]]
    shutil.rmtree(workdir / "none" / name, ignore_errors=True)  # open_clip_train refuses an existing run name
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(config_dir), *argv],
        cwd=workdir, env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (workdir / f"open_clip_{name}.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(
            f"open_clip_train ({name}) failed with exit code {proc.returncode}:\n{log[-4000:]}"
        )
    rates = [float(m.group(1)) for m in SPS_RE.finditer(log)]
    if len(rates) != n_steps:
        raise RuntimeError(
            f"open_clip_train ({name}) logged {len(rates)} steps, expected {n_steps}:\n{log[-4000:]}"
        )
    threads = re.search(r"BENCH_THREADS=(\d+)", log)
    out = summarise([args.batch_size / r for r in rates], args.warmup_steps, args.batch_size)
    out.update(wall_s=round(wall, 1), threads=int(threads.group(1)) if threads else None)
    if distill is not None and "Distill_loss" not in log:
        raise RuntimeError(f"open_clip_train ({name}) did not log a distillation loss: it did not distil")
    return out


# -- mmkd --------------------------------------------------------------------------------------------------------
def run_mmkd(name: str, workdir: Path, full_teacher, teacher, dataset, collator, args, **loss) -> dict:
    from transformers import PrinterCallback, TrainerCallback

    from mmkd.students import build_student
    from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks = [time.perf_counter()]

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    student, _ = build_student(full_teacher, strategy="every_other", seed=0)
    cfg = CLIPDistillationConfig(
        output_dir=str(workdir / f"mmkd_{name}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=args.workers,
        logging_steps=1,  # like open_clip_train's --log-every-n-steps 1
        disable_tqdm=True,
        max_grad_norm=0.0,  # open_clip_train does not clip by default
        seed=0,
        **loss,
    )
    timer = StepTimer()
    trainer = CLIPDistillationTrainer(
        model=student,
        teacher=teacher,
        args=cfg,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # keep the benchmark's output readable (logging still happens)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    out = summarise(steps, args.warmup_steps, args.batch_size)
    out.update(wall_s=round(wall, 1), threads=torch.get_num_threads())
    return out


# -- report ------------------------------------------------------------------------------------------------------
LABELS = {
    "open_clip_distill": "open_clip_train, distillation (`--distill-model`)",
    "open_clip_student": "open_clip_train, student alone (no teacher)",
    "mmkd_live": "mmkd, live teacher",
    "mmkd_cached": "mmkd, cached teacher embeddings",
    "mmkd_no_teacher": "mmkd, no teacher (contrastive only)",
}


def table(results: dict) -> str:
    """The runs as a Markdown table, with each rate relative to open_clip's distillation and to the no-teacher run."""
    ref = results.get("open_clip_distill", {}).get("samples_per_s")
    lim = results.get("mmkd_no_teacher", {}).get("samples_per_s")
    header = ["configuration", "samples/s", "s/step (mean)", "s/step (median)", "× open_clip distillation",
              "× no-teacher limit"]
    rows = []
    for key, label in LABELS.items():
        if key not in results:
            continue
        r = results[key]
        sps = r["samples_per_s"]
        rows.append([label, f"{sps:.2f}", f"{r['s_per_step']:.2f}", f"{r['median_s_per_step']:.2f}",
                     f"{sps / ref:.2f}" if ref else "-", f"{sps / lim:.2f}" if lim else "-"])
    return markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="teacher: open_clip model name or JSON model config")
    p.add_argument("--tiny", action="store_true", help=f"use {TINY_CONFIG.relative_to(REPO)} (smoke test)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps discarded at the start of each run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers, on every side")
    p.add_argument("--image-size", type=int, default=224, help="size of the generated PNG images")
    p.add_argument("--no-open-clip-student", action="store_true", help="skip the open_clip student-alone row")
    p.add_argument("--workdir", default=None, help="keep images, configs and logs here (default: a temp dir)")
    p.add_argument("--output", default="results.json", help="write the figures as JSON here")
    args = p.parse_args()
    if args.tiny:
        args.model = str(TINY_CONFIG)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import open_clip

    datasets.disable_progress_bars()

    from mmkd.data import CLIPDistillationCollator
    from mmkd.data.cache import cache_teacher_embeddings
    from mmkd.teachers import load_teacher

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmkd-train-throughput-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)

    # Models: the teacher's random weights go to a checkpoint that open_clip_train loads as --distill-pretrained
    # (it only distils when that is set); the half-depth student's config is registered in its subprocess.
    teacher_name, teacher_cfg = model_config(args.model)
    student_name = f"{teacher_name}-half"
    config_dir = workdir / "configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{student_name}.json").write_text(json.dumps(half_depth_config(teacher_cfg), indent=2))
    if args.model.endswith(".json"):
        (config_dir / f"{teacher_name}.json").write_text(json.dumps(teacher_cfg, indent=2))
    torch.manual_seed(0)
    teacher = load_teacher(args.model, pretrained=None)
    ckpt = workdir / "teacher_random.pt"
    torch.save(teacher.model.state_dict(), ckpt)
    full = teacher.to_transformers()
    processor = teacher.transformers_processor()

    # Data: the same PNG files and captions for everyone.
    n = args.batch_size * (args.warmup_steps + args.steps)
    paths, texts, csv = write_data(workdir, n, args.image_size)
    dataset = datasets.Dataset.from_dict({"image": paths, "text": texts}).cast_column(
        "image", datasets.Image()
    )
    lengths = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]

    print(
        f"teacher {teacher_name} ({teacher_cfg['vision_cfg']['layers']}+{teacher_cfg['text_cfg']['layers']} layers), "
        f"student {student_name}, batch {args.batch_size}, fp32, {args.warmup_steps} warm-up + {args.steps} timed "
        f"steps, {args.workers} workers, {torch.get_num_threads()} torch threads, {n} images in {workdir}",
        flush=True,
    )
    results: dict[str, dict] = {}

    def report(key: str, r: dict) -> None:
        results[key] = r
        print(
            f"{LABELS[key]}: {r['samples_per_s']:.2f} samples/s, {r['s_per_step']:.2f} s/step "
            f"(median {r['median_s_per_step']:.2f}), steps {r['step_times_s']}",
            flush=True,
        )

    report(
        "open_clip_distill",
        run_open_clip(
            "distill", workdir, config_dir, student_name, csv, args, distill=(teacher_name, str(ckpt))
        ),
    )
    if not args.no_open_clip_student:
        report(
            "open_clip_student", run_open_clip("student", workdir, config_dir, student_name, csv, args, None)
        )

    distill_loss = dict(
        contrastive_weight=1.0, affinity_weight=1.0, image_distill_weight=1.0, text_distill_weight=1.0,
        triplet_weight=0.0,
    )  # fmt: skip
    live_collator = CLIPDistillationCollator(processor, teacher.inputs())
    report(
        "mmkd_live", run_mmkd("live", workdir, full, teacher, dataset, live_collator, args, **distill_loss)
    )

    t0 = time.perf_counter()
    cached = cache_teacher_embeddings(dataset, teacher, workdir / "teacher_cache", batch_size=args.batch_size)
    cache_build_s = time.perf_counter() - t0
    print(f"teacher-embedding cache for {n} examples built in {cache_build_s:.1f} s", flush=True)
    report(
        "mmkd_cached", run_mmkd("cached", workdir, full, None, cached, live_collator, args, **distill_loss)
    )
    results["mmkd_cached"]["cache_build_s"] = round(cache_build_s, 2)

    no_teacher = dict(
        contrastive_weight=1.0, affinity_weight=0.0, image_distill_weight=0.0, text_distill_weight=0.0,
        triplet_weight=0.0,
    )  # fmt: skip
    report(
        "mmkd_no_teacher",
        run_mmkd(
            "no_teacher",
            workdir,
            full,
            None,
            dataset,
            CLIPDistillationCollator(processor),
            args,
            **no_teacher,
        ),
    )

    live = results["mmkd_live"]["samples_per_s"] / results["open_clip_distill"]["samples_per_s"]
    cache = results["mmkd_cached"]["samples_per_s"] / results["mmkd_no_teacher"]["samples_per_s"]
    targets = {  # issue 18 (1.1 in issue 4)
        "mmkd_live_vs_open_clip_distill": {"ratio": round(live, 3), "target": 1.5, "met": live >= 1.5},
        "mmkd_cached_vs_no_teacher": {"ratio": round(cache, 3), "target": 0.95, "met": cache >= 0.95},
    }
    figures = {
        "model": teacher_name,
        "student": f"{student_name} ({math.ceil(teacher_cfg['vision_cfg']['layers'] / 2)} vision + "
        f"{math.ceil(teacher_cfg['text_cfg']['layers'] / 2)} text layers)",
        "batch_size": args.batch_size,
        "precision": "fp32",
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.steps,
        "workers": args.workers,
        "images": n,
        "image_size": args.image_size,
        "caption_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "results": {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                    for k, v in results.items()},
        "targets": targets,
    }  # fmt: skip
    print()
    print(table(results))
    print()
    print(
        f"mmkd live teacher / open_clip distillation = {live:.2f} (target >= 1.5: {'met' if live >= 1.5 else 'MISSED'})"
    )
    print(
        f"mmkd cached / no-teacher limit = {cache:.2f} (target >= 0.95: {'met' if cache >= 0.95 else 'MISSED'})"
    )
    print(f"one-off teacher-embedding cache build: {cache_build_s:.1f} s for {n} examples")
    disturbed = {k: r["disturbed_steps"] for k, r in results.items() if r["disturbed_steps"]}
    if disturbed:
        print(
            f"WARNING: timed steps over 1.5x their run's median (another process on the CPU?): {disturbed}; rerun"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))
        print(f"figures written to {args.output}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
