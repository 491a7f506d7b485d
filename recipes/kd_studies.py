"""Research 001's experiments on CLIP students: Hinton KD on zero-shot class logits, teacher assistants,
teacher-free KD and the data-fraction study, on the offline Fashion-MNIST job (after ``make demo``).

Every study distils the demo's teacher (6+6 layers, width 192, ``out/offline/teacher``) into students trained
**from random initialisation** (the setting of Hinton et al. and of research 001, where KD is the only link to the
teacher), 200 steps x 128 captioned images with the demo's student schedule (``recipes/configs/
fashion_mnist_student.yaml``, lr 1e-3). Every student is trained on CLIP's contrastive loss plus the class-logit term
``(1 − α)·CE + α·T²·KL`` of :mod:`mmkd.losses.logits` ("scratch" is ``α = 0``: labels only, no teacher) and is
evaluated zero-shot (acc@1 / acc@5) on the 10,000 test images with the 20 caption templates. The study student is
2+2 layers of width 96 (1.3 M parameters in its towers' transformers; the teacher's 6+6 x 192); the teacher's image
embeddings are cached once per teacher and training set (:mod:`mmkd.data.cache`), so a run costs the student alone.

    grid --term class_kd   α x T of the class-logit KD (research 001 experiment 2): heatmap + table
    grid --term affinity   CLIP-KD's affinity weight x temperature on top of the scratch recipe
    assistants             1+1-layer width-96 student: directly from the teacher vs through 1 and 2 assistants
                           (``--chain``; Mirzadeh et al. 2020; experiment 6, Table 3's shape)
    teacher-free           born-again (a scratch student teaches a fresh one), the virtual teacher (a), a distilled
                           student as teacher, vs scratch and vs the real teacher (Yuan et al. 2020; experiments 4-5)
    data-fraction          KD vs scratch at 5, 10, 25, 50, 100 % of the 20,000 training images, same steps
                           (experiment 3): the curve

    python recipes/kd_studies.py grid --term class_kd          # = make kd-grid
    python recipes/kd_studies.py assistants                    # = make kd-assistants ...

Runs live in ``--output_dir`` (default ``out/kd``) under names that say their configuration, so the studies share
them (the grid's scratch and KD cells are the other studies' scratch and real-teacher rows); a folder holding a
finished run of the same arguments is reused. Where two compared rows are within 1 point after seed 0, both get
``--seeds`` (default 1,2) more; a grid's best cell and scratch always do (the best of many cells is biased up). Each study writes ``<study>.md``, ``<study>.json`` and ``<study>.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent
STUDENT_CONFIG = RECIPES / "configs" / "fashion_mnist_student.yaml"
STUDIES = ("grid", "assistants", "teacher-free", "data-fraction")
TERMS = ("class_kd", "affinity")
TRAIN_IMAGES = 20_000  # the config's max_train_samples: "100 %"


def shape_args(layers: int, width: int) -> list[str]:
    """Both towers ``layers`` deep and ``width`` wide."""
    return [arg for tower in ("vision", "text") for arg in (f"--student_{tower}_layers", str(layers),
                                                             f"--student_{tower}_width", str(width))]


STUDENT = (2, 96)  # the study student: 2+2 layers, width 96
SMALLEST = (1, 96)  # the assistants study's student


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=STUDIES)
    p.add_argument("--term", choices=TERMS, default="class_kd", help="grid: which term's two parameters")
    p.add_argument("--teacher", default="out/offline/teacher", help="the demo's teacher folder")
    p.add_argument("--output_dir", default="out/kd")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="grid --term class_kd: α values")
    p.add_argument("--temperatures", default="1,2,4,8", help="grid --term class_kd: T values")
    p.add_argument("--affinity_weights", default="0.5,1,2", help="grid --term affinity: weights")
    p.add_argument("--affinity_temperatures", default="0.01,0.05,0.1", help="grid --term affinity: temperatures")
    p.add_argument("--alpha", type=float, default=0.5, help="the KD recipe's α in the other studies")
    p.add_argument("--temperature", type=float, default=4.0, help="the KD recipe's T in the other studies")
    p.add_argument("--assistants", default="4;3;2;4,2", help="assistants study: chains, ';'-separated")
    p.add_argument("--virtual_a", default="0.9,0.99", help="teacher-free: the virtual teacher's a values")
    p.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1", help="data-fraction: shares of the 20,000 images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="1,2", help="extra seeds for compared rows within 1 point")
    p.add_argument("--max_steps", type=int, default=None, help="override the config's 200 steps")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    args = p.parse_args(argv)
    from mmkd.reporting.sweeps import parse_values

    try:
        for option in ("alphas", "temperatures", "affinity_weights", "affinity_temperatures", "virtual_a",
                       "fractions"):
            setattr(args, option, parse_values(f"--{option}", getattr(args, option)))
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip() and int(s) != args.seed]
    except ValueError as err:
        p.error(str(err))
    if any(not 0 <= a <= 1 for a in args.alphas):
        p.error(f"--alphas {args.alphas}: α is in [0, 1]")
    if not 0 < args.alpha <= 1:
        p.error(f"--alpha {args.alpha:g}: the KD recipe's α is in (0, 1] (α = 0 is the scratch row)")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions {args.fractions}: shares in (0, 1]")
    if any(not 0 < a <= 1 for a in args.virtual_a):
        p.error(f"--virtual_a {args.virtual_a}: a is in (0, 1]")
    if not (Path(args.teacher) / "config.json").is_file():
        p.error(f"--teacher {args.teacher}: no CLIPModel folder there (run make demo first)")
    return args


# -- configurations ------------------------------------------------------------------------------------------------
def kd_args(alpha: float, temperature: float) -> list[str]:
    """The class-logit term; at α = 0 (labels only) T is irrelevant and fixed to 1, so every α = 0 is one run."""
    return ["--class_kd_weight", "1", "--class_kd_alpha", f"{alpha:g}",
            "--class_kd_temperature", f"{temperature:g}" if alpha > 0 else "1"]


class Study:
    """One study's runs: configurations by name, trained and evaluated through a shared StudyRunner."""

    def __init__(self, args):
        from mmkd.data.fashion_mnist import DEFAULT_TEMPLATES, fashion_mnist_classification
        from mmkd.reporting.studies import StudyRunner

        self.args = args
        self.out = Path(args.output_dir)
        test = fashion_mnist_classification("test", data_dir=args.data_dir)
        self.runner = StudyRunner(self.out / "runs", test, [t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES])
        self.runs: dict[str, list[dict[str, Any]]] = {}

    def argv(self, extra: list[str], teacher: str | None = None, images: int | None = None) -> list[str]:
        """The study recipe for ``teacher`` (default ``--teacher``) on ``images`` training images (default all)."""
        teacher = teacher or self.args.teacher
        # a cache folder per teacher and training set (each holds entries keyed by the teacher's weights)
        tag = hashlib.sha256(str(Path(teacher).resolve()).encode()).hexdigest()[:8]
        argv = ["--config", str(STUDENT_CONFIG), "--teacher_name_or_path", teacher, "--report_to", "none",
                "--student_init", "random", "--triplet_weight", "0", "--image_distill_weight", "0",
                "--text_distill_weight", "0", "--contrastive_weight", "1.0", "--affinity_weight", "0",
                "--learning_rate", "0.001",
                "--teacher_cache_dir", str(self.out / "cache" / f"{tag}-{images or TRAIN_IMAGES}"), *extra]
        if images:
            argv += ["--max_train_samples", str(images)]
        if self.args.max_steps:
            argv += ["--max_steps", str(self.args.max_steps)]
        if self.args.data_dir:
            argv += ["--data_dir", self.args.data_dir]
        return argv

    def run(self, name: str, argv: list[str], seed: int | None = None) -> dict[str, Any]:
        """Run ``name`` at ``seed`` once per study (a second call returns the first result)."""
        seed = self.args.seed if seed is None else seed
        done = [r for r in self.runs.get(name, []) if r["seed"] == seed]
        if done:
            return done[0]
        result = self.runner.run(name, argv, seed)
        self.runs.setdefault(name, []).append(result)
        return result

    def row(self, name: str) -> dict[str, Any]:
        from mmkd.reporting.studies import aggregate

        return {"name": name, **aggregate(self.runs[name])}

    def more_seeds(self, configs: dict[str, list[str]], pairs: list[tuple[str, str]], always: bool = False) -> None:
        """Seeds ``--seeds`` for the compared rows within 1 point of each other (``always``: for every row of the
        pairs), again after each round: the extra seeds move the means, and with them which rows are close."""
        from mmkd.reporting.studies import close_pairs

        done: set[str] = set()
        while True:  # until no pair is newly close: more seeds move the means a row is compared with
            close = ({name for pair in pairs for name in pair} if always else
                     close_pairs({name: self.row(name) for name in self.runs}, pairs))
            if close <= done:
                return
            for name in sorted(close - done):
                for seed in self.args.seeds:
                    self.run(name, configs[name], seed)
            done |= close

    def write(self, stem: str, rows: list[dict[str, Any]], table: str, title: str, notes: str = "",
              extra: dict[str, Any] | None = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{stem}.md").write_text(f"# {title}\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
        (self.out / f"{stem}.json").write_text(json.dumps({"command": " ".join(["recipes/kd_studies.py",
                                                                                *sys.argv[1:]]),
                                                            "rows": rows, **(extra or {})}, indent=2) + "\n")
        print(f"\n# {title}\n\n{table}\n{notes}")


def acc(row: dict[str, Any] | None) -> str:
    from mmkd.reporting.tables import pct

    if row is None:
        return "n/a"
    spread = f" ± {100 * row['acc1_sd']:.2f}" if row.get("acc1_sd") is not None else ""
    return pct(row["acc1"]) + spread


def student_name(alpha: float, temperature: float, shape: tuple[int, int] = STUDENT, prefix: str = "") -> str:
    base = f"{prefix}s{shape[0]}x{shape[1]}"
    return f"{base}-scratch" if alpha == 0 else f"{base}-kd-a{alpha:g}-T{temperature:g}"


# -- the studies ---------------------------------------------------------------------------------------------------
def grid_study(study: Study) -> list[dict[str, Any]]:
    from mmkd.reporting.sweeps import Grid, run_grid, write_grid
    from mmkd.reporting.tables import markdown_table

    args = study.args
    shape = shape_args(*STUDENT)
    configs: dict[str, list[str]] = {}
    if args.term == "class_kd":
        grid = Grid("alpha", args.alphas, "temperature", args.temperatures, metric="acc1", row_label="α",
                    col_label="T", metric_label="zero-shot acc@1 (%)")
        cells = {(a, t): student_name(a, t) for a in args.alphas for t in args.temperatures}
        for (a, t), name in cells.items():
            configs[name] = study.argv([*shape, *kd_args(a, t)])
    else:
        grid = Grid("affinity_weight", args.affinity_weights, "affinity_temperature", args.affinity_temperatures,
                    metric="acc1", row_label="affinity weight", col_label="affinity temperature",
                    metric_label="zero-shot acc@1 (%)")
        cells = {(w, t): f"s{STUDENT[0]}x{STUDENT[1]}-scratch-affinity-w{w:g}-t{t:g}"
                 for w in args.affinity_weights for t in args.affinity_temperatures}
        for (w, t), name in cells.items():
            configs[name] = study.argv([*shape, *kd_args(0, 1), "--affinity_weight", f"{w:g}",
                                        "--affinity_temperature", f"{t:g}"])
    baseline = student_name(0, 1)
    configs.setdefault(baseline, study.argv([*shape, *kd_args(0, 1)]))
    study.run(baseline, configs[baseline])
    run_grid(lambda r, c: study.run(cells[r, c], configs[cells[r, c]]), grid.row_values, grid.col_values,
             keys=(grid.row_key, grid.col_key))  # the one grid runner (the match recipe's sweep uses it too)
    best = max(dict.fromkeys(cells.values()), key=lambda n: study.row(n)["acc1"])
    # the best of many seed-0 cells is biased upward (the largest of noisy figures): it and scratch always get the
    # extra seeds, whatever their gap
    study.more_seeds(configs, [(best, baseline)], always=True)
    rows = [{**study.row(name), grid.row_key: r, grid.col_key: c} for (r, c), name in cells.items()]
    stem = f"grid-{args.term}"
    what = "class-logit KD α × T" if args.term == "class_kd" else "affinity weight × temperature"
    title = (f"{what}: zero-shot acc@1 (%) of the 2+2 × 96 student, {args.max_steps or 200} steps (the mean where a "
             "cell has several seeds)")
    extra = {"command": " ".join(["recipes/kd_studies.py", *sys.argv[1:]]), "baseline": study.row(baseline),
             "best": study.row(best)}
    write_grid(study.out, rows, grid, title=title, stem=stem, extra=extra)
    decide = markdown_table(["run", "seeds", "acc@1 (%)", "acc@5 (%)"],
                            [(n, ",".join(map(str, study.row(n)["seeds"])), acc(study.row(n)),
                              f"{100 * study.row(n)['acc5']:.2f}") for n in dict.fromkeys([baseline, best])])
    margin = study.row(best)["acc1"] - study.row(baseline)["acc1"]
    notes = (f"\nDeciding rows (the best cell against scratch, α = 0, no teacher):\n\n{decide}\n\n"
             f"Best cell − scratch: {100 * margin:+.2f} points.\n")
    with open(study.out / f"{stem}.md", "a") as md:
        md.write(notes)
    print((study.out / f"{stem}.md").read_text())
    return rows


def assistants_study(study: Study) -> list[dict[str, Any]]:
    from mmkd.reporting.plots import study_bars
    from mmkd.reporting.tables import markdown_table

    args = study.args
    smallest = shape_args(*SMALLEST)
    kd = kd_args(args.alpha, args.temperature)
    configs = {"no KD": study.argv([*smallest, *kd_args(0, 1)]), "baseline KD": study.argv([*smallest, *kd])}
    chains = [c.strip() for c in args.assistants.split(";") if c.strip()]
    for chain in chains:
        configs[f"TA {chain.replace(',', ' → ')}"] = study.argv([*smallest, *kd, "--chain", chain])
    names = {label: f"s{SMALLEST[0]}x{SMALLEST[1]}-" + ("scratch" if label == "no KD" else
                                                        "kd" if label == "baseline KD" else
                                                        f"ta{label[3:].replace(' → ', '-')}") +
             f"-a{args.alpha:g}-T{args.temperature:g}" * (label != "no KD") for label in configs}
    for label in configs:
        study.run(names[label], configs[label])
    direct = names["baseline KD"]
    study.more_seeds({names[k]: v for k, v in configs.items()},
                     [(names[k], direct) for k in configs if k != "baseline KD"] + [(names["no KD"], direct)])
    rows, cells = [], []
    for label, name in names.items():
        row = {**study.row(name), "label": label}
        assistants = []
        for run in study.runs[name]:
            summary = json.loads((Path(run["folder"]) / "training_summary.json").read_text())
            assistants.append([(stage["stage"], study.runner.evaluate(Path(stage["output_dir"]))["acc1"])
                               for stage in summary.get("chain", [])[:-1]])
        row["assistants_acc1"] = assistants[0] if assistants else []
        row["stages"] = 1 + len(row["assistants_acc1"])
        rows.append(row)
        cells.append((label, ",".join(map(str, row["seeds"])), acc(row), f"{100 * row['acc5']:.2f}",
                      f"{row['stages']} x {args.max_steps or 200}",
                      ", ".join(f"{s}: {100 * a:.2f}" for s, a in row["assistants_acc1"]) or "–"))
    table = markdown_table(["student 1+1 × 96", "seeds", "acc@1 (%)", "acc@5 (%)", "stages x steps",
                            "assistants' acc@1 (seed 0, %)"], cells)
    study.write("assistants", rows, table, "Teacher assistants: the 1+1-layer width-96 student of the 6+6 × 192 "
                "teacher (zero-shot acc@1 on the 10,000 test images)",
                f"KD recipe at every stage: α = {args.alpha:g}, T = {args.temperature:g}, contrastive 1.0, random "
                "init; every model (assistant or student) trains the same steps.")
    study_bars(rows, study.out / "assistants.png", "teacher assistants (Fashion-MNIST, 1+1 × 96 student)")
    return rows


def teacher_free_study(study: Study) -> list[dict[str, Any]]:
    from mmkd.reporting.plots import study_bars
    from mmkd.reporting.tables import markdown_table

    args = study.args
    shape = shape_args(*STUDENT)
    kd = kd_args(args.alpha, args.temperature)
    scratch, real = student_name(0, 1), student_name(args.alpha, args.temperature)
    configs = {scratch: study.argv([*shape, *kd_args(0, 1)]), real: study.argv([*shape, *kd])}
    for name in (scratch, real):
        study.run(name, configs[name])
    labels = {scratch: "from scratch (α = 0)", real: "real teacher (6+6 × 192)"}
    for a in args.virtual_a:
        name = f"{scratch}-virtual-a{a:g}"
        configs[name] = study.argv([*shape, *kd_args(0, 1), "--virtual_teacher_weight", "1",
                                    "--virtual_teacher_a", f"{a:g}"])
        labels[name] = f"virtual teacher, a = {a:g}"
    # a teacher that is itself a student (seed 0's): born-again and the distilled student as teacher
    for teacher, label in ((scratch, "born-again (scratch student as teacher)"),
                           (real, "distilled student as teacher")):
        name = f"s{STUDENT[0]}x{STUDENT[1]}-taught-by-{teacher}"
        configs[name] = study.argv([*shape, *kd], teacher=str(study.runner.folder(teacher, args.seed)))
        labels[name] = label
    for name in configs:
        if name not in study.runs:
            study.run(name, configs[name])
    study.more_seeds(configs, [(n, scratch) for n in configs if n != scratch] + [(n, real) for n in configs
                                                                                 if n not in (scratch, real)])
    rows = [{**study.row(n), "label": labels[n]} for n in configs]
    base = study.row(scratch)["acc1"]
    table = markdown_table(["student 2+2 × 96", "seeds", "acc@1 (%)", "acc@5 (%)", "vs scratch (points)"],
                           [(r["label"], ",".join(map(str, r["seeds"])), acc(r), f"{100 * r['acc5']:.2f}",
                             f"{100 * (r['acc1'] - base):+.2f}") for r in rows])
    study.write("teacher-free", rows, table, "Teacher-free KD: the 2+2-layer width-96 student (zero-shot acc@1)",
                f"Students taught by a model use the KD recipe α = {args.alpha:g}, T = {args.temperature:g}; the "
                "virtual teacher is added to the scratch recipe (weight 1, T = 1) and needs no teacher model; the "
                "student-teachers are seed 0's scratch and real-teacher students.")
    study_bars(rows, study.out / "teacher-free.png", "teacher-free KD (Fashion-MNIST, 2+2 × 96 student)")
    return rows


def data_fraction_study(study: Study) -> list[dict[str, Any]]:
    from mmkd.reporting.plots import fraction_curve
    from mmkd.reporting.tables import markdown_table

    args = study.args
    shape = shape_args(*STUDENT)
    configs, rows = {}, []
    for fraction in args.fractions:
        images = None if fraction == 1 else round(fraction * TRAIN_IMAGES)
        for alpha in (0.0, args.alpha):
            name = student_name(alpha, args.temperature) + ("" if images is None else f"-n{images}")
            configs[name] = study.argv([*shape, *kd_args(alpha, args.temperature)], images=images)
            study.run(name, configs[name])
    pairs = [(a, b) for a, b in zip(list(configs)[::2], list(configs)[1::2], strict=True)]
    study.more_seeds(configs, pairs)
    deciding = [pair for fraction, pair in zip(args.fractions, pairs, strict=True) if fraction in (0.1, 1)]
    study.more_seeds(configs, deciding, always=True)  # the target compares these two margins: never on one seed
    cells = []
    for fraction, (scratch, kd) in zip(args.fractions, pairs, strict=True):
        s, k = study.row(scratch), study.row(kd)
        rows.append({"fraction": fraction, "images": round(fraction * TRAIN_IMAGES), "scratch": s, "kd": k,
                     "margin": k["acc1"] - s["acc1"]})
        cells.append((f"{100 * fraction:g} %", f"{round(fraction * TRAIN_IMAGES):,}", acc(s), acc(k),
                      f"{100 * (k['acc1'] - s['acc1']):+.2f}"))
    table = markdown_table(["training images", "count", "scratch acc@1 (%)", "KD acc@1 (%)", "KD − scratch"], cells)
    margins = {r["fraction"]: r["margin"] for r in rows}
    notes = ""
    if 0.1 in margins and 1 in margins:
        ratio = margins[0.1] / margins[1] if margins[1] else float("inf")
        met = margins[0.1] >= 2 * margins[1] and margins[0.1] > 0
        notes = (f"Target (research 001's claim): KD's margin at 10 % ≥ 2 × its margin at 100 %: "
                 f"{100 * margins[0.1]:+.2f} vs {100 * margins[1]:+.2f} points (ratio {ratio:.2f}) — "
                 f"{'met' if met else 'missed'}.")
    study.write("data-fraction", rows, table, f"Data fraction: the 2+2 × 96 student, KD (α = {args.alpha:g}, "
                f"T = {args.temperature:g}) vs scratch, {args.max_steps or 200} steps x 128 at every fraction",
                notes)
    fraction_curve(rows, study.out / "data-fraction.png")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    study = Study(args)
    return {"grid": grid_study, "assistants": assistants_study, "teacher-free": teacher_free_study,
            "data-fraction": data_fraction_study}[args.study](study)


if __name__ == "__main__":
    main()
