"""The feature-distillation ablation on the offline job's Fashion-MNIST teacher (after ``make demo``).

For the half-depth student (3+3 layers, the teacher's width 192) and the narrow one (3+3 layers, width 96), each
trained with the demo's student recipe (``recipes/configs/fashion_mnist_student.yaml``: triplet + MSE/cosine +
contrastive + affinity, 200 steps x 128) plus one feature term:

    output      the output terms only (the demo's recipe)
    hint-last   + FitNets hints at the last layer (all tokens, MSE, linear projector when narrower)
    hint-all    + hints at every mapped layer
    attention   + MiniLM self-attention transfer at every mapped layer
    simkd       + SimKD: the teacher's projections reused as the student's head (folded in at save time)

and evaluates zero-shot acc@1 / acc@5 on the 10,000 test images, the training time per step, and for ``output``
and ``simkd`` the cross-model accuracies (student images against the teacher's class embeddings, and the
reverse). ``--deciding_seeds`` adds seeds for the narrow student's ``output`` row and its best feature row.
Training, reuse and evaluation are :class:`mmkd.reporting.studies.StudyRunner`'s.

    python recipes/feature_study.py --teacher out/offline/teacher --output_dir out/features

Writes ``results.md``, ``results.json`` and ``ablation.png`` in ``--output_dir``; a run whose folder holds a
finished student is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent
STUDENT_CONFIG = RECIPES / "configs" / "fashion_mnist_student.yaml"
SHAPES = {"half-depth": [], "narrow": ["--student_vision_width", "96", "--student_text_width", "96"]}
VARIANTS = {
    "output": [],
    "hint-last": ["--hint_weight", "1.0", "--hint_layers", "last"],
    "hint-all": ["--hint_weight", "1.0", "--hint_layers", "all"],
    "attention": ["--attention_weight", "1.0", "--attention_layers", "all"],
    "simkd": ["--simkd_weight", "1.0"],
}
CROSS = ("output", "simkd")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="out/offline/teacher", help="the demo's teacher folder")
    p.add_argument("--output_dir", default="out/features")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deciding_seeds", default="1,2", help="extra seeds for the narrow output and best feature rows")
    p.add_argument("--max_steps", type=int, default=None, help="override the config's 200 steps")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    args = p.parse_args(argv)
    for option, value, known in (("--shapes", args.shapes, SHAPES), ("--variants", args.variants, VARIANTS)):
        bad = [v for v in value.split(",") if v not in known]
        if bad:
            p.error(f"{option} {','.join(bad)}: choose from {', '.join(known)}")
    if not (Path(args.teacher) / "config.json").is_file():
        p.error(f"--teacher {args.teacher}: no CLIPModel folder there (run make demo first)")
    return args


def train_argv(args, shape: str, variant: str) -> list[str]:
    argv = ["--config", str(STUDENT_CONFIG), "--teacher_name_or_path", args.teacher, "--report_to", "none",
            *SHAPES[shape], *VARIANTS[variant]]
    if args.max_steps:
        argv += ["--max_steps", str(args.max_steps)]
    if args.data_dir:
        argv += ["--data_dir", args.data_dir]
    return argv


def evaluate(runner, args, folder: Path, cross: bool) -> dict[str, Any]:
    """Zero-shot accuracy and seconds per step (:class:`~mmkd.reporting.studies.StudyRunner`), and with ``cross``
    the cross-model accuracies."""
    from mmkd.eval.encoders import load_encoder
    from mmkd.eval.zeroshot import evaluate_zeroshot, zero_shot_classifier

    row = runner.evaluate(folder)
    if cross:  # can the student replace one half of a deployed teacher?
        student, teacher = load_encoder(str(folder)), load_encoder(args.teacher)
        classnames = runner.test.classnames
        for name, images, texts in (("student_image_teacher_text", student, teacher),
                                    ("teacher_image_student_text", teacher, student)):
            classifier = zero_shot_classifier(texts, classnames, runner.templates)
            row[name] = evaluate_zeroshot(images, runner.test, classifier=classifier, progress=False)["acc1"]
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    from mmkd.reporting.tables import markdown_table

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    header = ("student", "terms", "seeds", "acc@1 (%)", "acc@5 (%)", "s / step", "student image × teacher text",
              "teacher image × student text")
    cells = []
    for r in rows:
        spread = f" ± {100 * r['acc1_sd']:.2f}" if r.get("acc1_sd") is not None else ""
        cells.append([r["shape"], r["variant"], ",".join(map(str, r["seeds"])), pct(r["acc1"]) + spread,
                      pct(r["acc5"]), f"{r['seconds_per_step']:.2f}", pct(r.get("student_image_teacher_text")),
                      pct(r.get("teacher_image_student_text"))])
    return markdown_table(header, cells)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from mmkd.reporting.plots import _pyplot

    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(shapes)
    for i, shape in enumerate(shapes):
        by = {r["variant"]: r for r in rows if r["shape"] == shape}
        xs = [j + (i - (len(shapes) - 1) / 2) * width for j in range(len(variants))]
        ys = [100 * by[v]["acc1"] if v in by else 0 for v in variants]
        errs = [100 * (by[v].get("acc1_sd") or 0) if v in by else 0 for v in variants]
        bars = ax.bar(xs, ys, width, yerr=errs, label=shape, capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("zero-shot acc@1 on the 10,000 test images (%)")
    low = min(100 * r["acc1"] for r in rows)
    ax.set_ylim(max(0, low - 10), 100)
    ax.legend()
    ax.set_title("feature distillation ablation (Fashion-MNIST, 200 steps x 128)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    from mmkd.data.fashion_mnist import DEFAULT_TEMPLATES, fashion_mnist_classification
    from mmkd.reporting.studies import StudyRunner

    out = Path(args.output_dir)
    test = fashion_mnist_classification("test", data_dir=args.data_dir)
    runner = StudyRunner(out, test, [t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES])
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def run(shape: str, variant: str, seed: int) -> None:
        folder = runner.folder(f"{shape}-{variant}", seed)
        print(f"[feature study] {shape} / {variant} / seed {seed}", flush=True)
        runner.train(folder, [*train_argv(args, shape, variant), "--seed", str(seed)])
        runs.setdefault((shape, variant), []).append(
            {"seed": seed, **evaluate(runner, args, folder, variant in CROSS and seed == args.seed)})

    shapes, variants = args.shapes.split(","), args.variants.split(",")
    for shape in shapes:
        for variant in variants:
            run(shape, variant, args.seed)
    extra = [seed for seed in dict.fromkeys(int(s) for s in args.deciding_seeds.split(",") if s.strip())
             if seed != args.seed]  # the first seed is already run
    if "narrow" in shapes and extra and "output" in variants and len(variants) > 1:
        best = max((v for v in variants if v != "output"), key=lambda v: runs["narrow", v][0]["acc1"])
        for variant in ("output", best):
            for seed in extra:
                run("narrow", variant, seed)
    from mmkd.reporting.studies import aggregate

    rows = []
    for (shape, variant), seeds in runs.items():
        row = {"shape": shape, "variant": variant, **aggregate(seeds)}
        for key in ("student_image_teacher_text", "teacher_image_student_text"):
            if key in seeds[0]:
                row[key] = seeds[0][key]
        rows.append(row)
    table = markdown(rows)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    plot(rows, out / "ablation.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
