"""Peak memory and time of the batch-wide terms (contrastive + affinity) per rank: today's global loss vs the local
loss (``local_loss=True``, open_clip's ``--local-loss``), against the global batch size.

Embeddings only, world size simulated on one machine: a rank of a ``W``-process run holds the gathered ``(N, D)``
student and teacher embeddings of the global batch ``N``. Today every rank scores all ``N x N`` pairs; with the
local loss it scores its own ``N / W`` rows against the ``N`` columns, in both directions. Each configuration runs
in a fresh subprocess: a forward and backward of ``clip_contrastive_loss + affinity_distillation_loss`` (the
functions the loss modules call, with ``rows=slice(0, N / W)`` for the local loss), ``--repeats`` times after one
warm-up; its peak memory is the process's peak resident set (``ru_maxrss``) minus its resident set just before the
first forward (the embeddings and the libraries), and its time is the median forward + backward.

Configurations whose memory, extrapolated from the largest one run (memory grows as ``N^2``), would exceed
``--max-gb`` are not run; the table gives the estimate instead, marked as such.

    python benchmarks/local_loss.py                                  # N = 1k ... 32k, W = 2 and 8, D = 512
    python benchmarks/local_loss.py --sizes 1024 2048 --repeats 1    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(n: int, world_size: int, dim: int, repeats: int) -> dict:
    """One configuration, in this process: ``world_size=1`` is today's global loss."""
    import torch

    from mmkd.losses.clip import affinity_distillation_loss, clip_contrastive_loss

    torch.manual_seed(0)
    student_image = torch.randn(n, dim, requires_grad=True)  # (N, D): the gathered batch, as every rank holds it
    student_text = torch.randn(n, dim, requires_grad=True)
    teacher_image, teacher_text = torch.randn(n, dim), torch.randn(n, dim)
    logit_scale = torch.tensor(100.0, requires_grad=True)
    rows = None if world_size == 1 else slice(0, n // world_size)  # rank 0's rows

    def step() -> float:
        start = time.perf_counter()
        loss = clip_contrastive_loss(student_image, student_text, logit_scale, rows) + affinity_distillation_loss(
            student_image, student_text, teacher_image, teacher_text, 0.05, rows
        )
        loss.backward()
        seconds = time.perf_counter() - start
        student_image.grad = student_text.grad = logit_scale.grad = None
        return seconds

    before = _rss_bytes()
    times = [step() for _ in range(repeats + 1)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_bytes": peak - before, "seconds": sorted(times)[len(times) // 2]}


def measure(n: int, world_size: int, dim: int, repeats: int) -> dict:
    """:func:`run_one` in a fresh subprocess (peak memory is per process)."""
    cmd = [sys.executable, __file__, "--child", str(n), str(world_size), str(dim), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="global batch sizes N")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 8], help="simulated world sizes W")
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes (after one warm-up)")
    p.add_argument("--max-gb", type=float, default=12.0, help="do not run a configuration estimated above this")
    p.add_argument("--output", default="local_loss.json")
    p.add_argument("--plot", default=None, help="write a PNG of memory and time against N here")
    p.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    bad = [n for n in args.sizes for w in args.world_sizes if n % w]
    if bad:
        p.error(f"--sizes {bad[0]} is not divisible by every --world-sizes {args.world_sizes}")

    import torch

    modes = [("global", 1)] + [(f"local, W={w}", w) for w in args.world_sizes]
    rows: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for name, w in modes:
        for n in sorted(args.sizes):
            done = [r for r in rows[name] if not r["estimated"]]
            if done:  # memory ~ N^2: extrapolate from the largest run
                last = done[-1]
                estimate = last["peak_bytes"] * (n / last["n"]) ** 2
                if estimate > args.max_gb * 2**30:
                    rows[name].append({"n": n, "peak_bytes": estimate, "seconds": None, "estimated": True})
                    print(f"{name:>12}  N={n:6d}  estimated {estimate / 2**30:6.2f} GiB > --max-gb: not run", flush=True)
                    continue
            got = measure(n, w, args.dim, args.repeats)
            rows[name].append({"n": n, **got, "estimated": False})
            print(f"{name:>12}  N={n:6d}  {got['peak_bytes'] / 2**30:6.2f} GiB  {got['seconds']:7.3f} s", flush=True)

    figures = {
        "dim": args.dim, "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "rows": rows,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    print()
    print(table(rows, args.world_sizes))
    if args.plot:
        plot(rows, args.plot)


def _gib(row: dict) -> str:
    value = f"{row['peak_bytes'] / 2**30:.2f}"
    return f"~{value} (est.)" if row["estimated"] else value


def table(rows: dict[str, list[dict]], world_sizes: list[int]) -> str:
    """Markdown: per N, each mode's peak GiB and seconds, and global / local memory ratios."""
    head = ["N", "global GiB", "global s"]
    for w in world_sizes:
        head += [f"local W={w} GiB", f"local W={w} s", f"memory saved (W={w})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, g in enumerate(rows["global"]):
        cells = [str(g["n"]), _gib(g), "—" if g["seconds"] is None else f"{g['seconds']:.3f}"]
        for w in world_sizes:
            local = rows[f"local, W={w}"][i]
            ratio = g["peak_bytes"] / local["peak_bytes"]
            est = g["estimated"] or local["estimated"]
            cells += [_gib(local), "—" if local["seconds"] is None else f"{local['seconds']:.3f}",
                      f"{'~' if est else ''}{ratio:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    for name, series in rows.items():
        ran = [r for r in series if not r["estimated"]]
        line = mem.plot([r["n"] for r in ran], [r["peak_bytes"] / 2**30 for r in ran], "o-", label=name)[0]
        est = [ran[-1], *[r for r in series if r["estimated"]]] if ran else []
        if len(est) > 1:
            mem.plot([r["n"] for r in est], [r["peak_bytes"] / 2**30 for r in est], "--", color=line.get_color())
        sec.plot([r["n"] for r in ran], [r["seconds"] for r in ran], "o-", label=name)
    for ax, label in ((mem, "peak memory per rank (GiB; dashed: N² estimate)"), (sec, "forward + backward (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("contrastive + affinity terms per rank: global vs local loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
