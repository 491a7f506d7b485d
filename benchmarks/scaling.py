"""How the cost of a run grows: samples/s on 1 and 2 processes, and peak memory per process against batch size.

Real runs of ``recipes/clip_student.py`` (the smoke config's losses: triplet, MSE + cosine, contrastive, affinity)
with a mid-sized random open_clip teacher written to the work dir (``--width`` wide, ``--layers`` + ``--layers``
deep, ``--image-size`` px, patch 16) and its half-depth student, on generated shapes:

* **throughput**: each world size runs twice, ``--short`` and ``--long`` steps, and the steady-state samples/s is
  ``(long - short) x global batch / (train_runtime(long) - train_runtime(short))`` — start-up, the first steps and
  the save cancel out. Two processes go through ``accelerate launch --multi_gpu`` over gloo with one thread each,
  one process through ``accelerate launch --num_processes 1`` with 2 threads, so both use the same two cores.
* **memory**: one process, ``--short`` steps per per-device batch size; the figure is the peak resident set of the
  largest process of the run (``ru_maxrss`` of the children) — the models, the optimizer state and one step's
  activations — and the slope between batch sizes is the per-sample activation cost.

    python benchmarks/scaling.py --output scaling.json
    python benchmarks/scaling.py --batch-sizes 8 16 --short 2 --long 4      # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"


def teacher_config(width: int, layers: int, image_size: int) -> dict:
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": 64,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": width // 64,
                     "layers": layers},
    }


def launch(workdir: Path, name: str, processes: int, batch: int, steps: int, teacher: Path, examples: int) -> dict:
    """One run; returns its train_runtime and the peak resident set of its largest process."""
    out = workdir / name
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if processes == 1:
        engine = ["--num_processes", "1"]
        threads = "2"
    else:
        engine = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(29400 + processes)]
        threads = "1"
    cmd = [accelerate, "launch", *engine, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "recipes/clip_student.py", "--config", str(SMOKE), "--teacher_name_or_path", str(teacher),
           "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
           "--num_generated_examples", str(examples), "--save_strategy", "no", "--report_to", "none",
           "--logging_steps", str(steps), "--warmup_steps", "0", "--disable_tqdm", "true"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    runtime = next(row["train_runtime"] for row in history if "train_runtime" in row)
    # ru_maxrss of the children is a running maximum: a run that stays below an earlier one reports nothing new
    return {"train_runtime": runtime, "peak_rss_gib": peak / 2**20 if peak > before else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6, help="teacher depth per tower (the student keeps half)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=32, help="per-process batch of the throughput runs")
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="per-device batch sizes of the memory runs, ascending")
    p.add_argument("--workdir", default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if args.long <= args.short:
        raise SystemExit(f"error: --long {args.long} must exceed --short {args.short}")
    if sorted(args.batch_sizes) != args.batch_sizes:
        raise SystemExit("error: --batch-sizes must be ascending (the peak memory is a running maximum)")

    tmp = tempfile.TemporaryDirectory(prefix="mmkd-scaling-") if args.workdir is None else None
    workdir = Path(tmp.name if tmp else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = workdir / "teacher.json"
    teacher.write_text(json.dumps(teacher_config(args.width, args.layers, args.image_size)))
    examples = max(args.batch * 2 * args.long, max(args.batch_sizes) * args.short)

    # Memory first, ascending batch, one process (the running maximum of ru_maxrss then grows run by run).
    memory = []
    for b in args.batch_sizes:
        r = launch(workdir, f"mem_b{b}", 1, b, args.short, teacher, examples)
        memory.append({"batch": b, "peak_rss_gib": r["peak_rss_gib"]})
        print(f"memory  1 process  batch {b:4d}: peak RSS {r['peak_rss_gib']} GiB", flush=True)
    throughput = []
    for w in (1, 2):
        short = launch(workdir, f"tp{w}_short", w, args.batch, args.short, teacher, examples)
        long = launch(workdir, f"tp{w}_long", w, args.batch, args.long, teacher, examples)
        seconds = long["train_runtime"] - short["train_runtime"]
        rate = (args.long - args.short) * args.batch * w / seconds
        throughput.append({"processes": w, "global_batch": args.batch * w, "samples_per_s": rate,
                           "s_per_step": seconds / (args.long - args.short)})
        print(f"throughput {w} process(es), global batch {args.batch * w}: {rate:.1f} samples/s, "
              f"{seconds / (args.long - args.short):.3f} s/step", flush=True)

    print("\n| processes | global batch | samples/s | s/step | × 1 process |\n|---|---|---|---|---|")
    for t in throughput:
        print(f"| {t['processes']} | {t['global_batch']} | {t['samples_per_s']:.1f} | {t['s_per_step']:.3f} | "
              f"{t['samples_per_s'] / throughput[0]['samples_per_s']:.2f} |")
    print("\n| per-device batch | peak RSS GiB (1 process) |\n|---|---|")
    for m in memory:
        print(f"| {m['batch']} | {m['peak_rss_gib']:.2f} |" if m["peak_rss_gib"] else f"| {m['batch']} | — |")
    if args.output:
        Path(args.output).write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "args": vars(args),
            "teacher": teacher_config(args.width, args.layers, args.image_size),
            "throughput": throughput, "memory": memory}, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
