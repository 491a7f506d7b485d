"""The offline main job, end to end: teacher from scratch -> distilled half-depth student -> from-scratch baseline ->
zero-shot and bias evaluation -> results table (Markdown + JSON), plots and the students' model cards.

No pretrained CLIP can be downloaded on an offline machine, so the job first trains a small CLIP teacher on the
offline default dataset (captioned Fashion-MNIST, ``recipes/train_teacher.py``), distils it into a student with half
the layers in both towers (``recipes/clip_student.py``), trains the same student architecture from random weights
with no teacher for the same number of steps and batch size (the baseline), and evaluates all three on the held-out
test split (10,000 images, never seen in training). ``make demo`` runs it:

    accelerate launch --num_processes 1 recipes/offline_job.py --config recipes/configs/offline_job.yaml

Outputs in ``--output_dir`` (default ``out/offline``): ``teacher/``, ``distilled/``, ``scratch/`` (stock
``CLIPModel`` folders; the students with a ``README.md`` model card), ``results.json``, ``results.md``,
``zeroshot_accuracy.png``, ``training_loss.png``, ``bias.png``. A stage whose folder holds a finished run with the
same arguments is reused (``--overwrite true`` retrains); an interrupted stage resumes from its last checkpoint.
On real data the same recipes run with other configs (``recipes/configs/vit_b32_cc3m.yaml``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from mmkd.args import config_errors, import_script, parse_args
from mmkd.checks import ConfigError, at_least, integer_at_least, optional, run_checks
from mmkd.distributed import shutdown
from mmkd.trainers import CLIPDistillationConfig
from mmkd.trainers.checkpoints import IncompleteCheckpoint, latest_checkpoint

RECIPES = Path(__file__).resolve().parent
clip_student = import_script(RECIPES / "clip_student.py")
train_teacher = import_script(RECIPES / "train_teacher.py")

STAGE_RECORD = "mmkd_job_stage.json"

BIAS_NOTE = (
    "On the offline default dataset the text tower only ever saw Fashion-MNIST captions (ten clothing classes): "
    "profession and gender words are tokens it never trained on, so these figures describe the near-random "
    "embeddings of unseen words, not a learned social bias. The procedure is the point here; on a teacher trained "
    "on web captions the same report measures what the student inherits."
)


@dataclass
class JobArguments:
    output_dir: str = field(default="out/offline", metadata={"help": "Where the three models and the results go."})
    teacher_config: str = field(
        default="recipes/configs/fashion_mnist_teacher.yaml", metadata={"help": "Config of recipes/train_teacher.py."}
    )
    student_config: str = field(
        default="recipes/configs/fashion_mnist_student.yaml", metadata={"help": "Config of recipes/clip_student.py."}
    )
    architecture: str | None = field(
        default=None, metadata={"help": "Override the teacher's architecture (an open_clip model config JSON)."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Training steps of every stage (default: each config's own)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Training images (class-balanced)."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files (default: the Debian package's)."}
    )
    scratch_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the from-scratch baseline (default: the teacher config's, the recipe "
                  "known to train this architecture from random weights)."},
    )
    train_overrides: str = field(
        default="", metadata={"help": "Extra options for all three training stages, e.g. '--logging_steps 5'."}
    )
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on this many test images (class-balanced; default all 10,000)."}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the zero-shot evaluation."})
    bias_permutations: int = field(default=10000, metadata={"help": "Permutations of the WEAT p-value."})
    overwrite: bool = field(default=False, metadata={"help": "Retrain stages even when a finished run is there."})


# 1. Training stages ---------------------------------------------------------------------------------------------
def _config_value(config: str, key: str) -> Any:
    return yaml.safe_load(Path(config).read_text()).get(key)


def stage_argvs(job: JobArguments) -> dict[str, list[str]]:
    """The argument lists of the three training runs. Same data, steps and batch size for the two students."""
    out = Path(job.output_dir)
    shared: list[str] = []
    for option in ("max_steps", "max_train_samples", "data_dir"):
        if getattr(job, option) is not None:
            shared += [f"--{option}", str(getattr(job, option))]
    shared += shlex.split(job.train_overrides)
    teacher = ["--config", job.teacher_config, *shared, "--output_dir", str(out / "teacher")]
    if job.architecture:
        teacher += ["--architecture", job.architecture]
    student = ["--config", job.student_config, "--teacher_name_or_path", str(out / "teacher"), *shared]
    scratch_lr = job.scratch_learning_rate or _config_value(job.teacher_config, "learning_rate")
    scratch = [
        *student,
        # No teacher anywhere: random weights, every term of the loss table off but CLIP's contrastive loss, as when
        # training the teacher.
        "--student_init", "random",
        *[a for field in dict.fromkeys(term.field for term in CLIPDistillationConfig.loss_terms.values())
          for a in (f"--{field}", "1.0" if field == "contrastive_weight" else "0")],
        *(["--learning_rate", str(scratch_lr)] if scratch_lr else []),
        "--output_dir", str(out / "scratch"),
    ]
    return {"teacher": teacher, "distilled": [*student, "--output_dir", str(out / "distilled")], "scratch": scratch}


def run_stage(name: str, main, argv: list[str], folder: Path, overwrite: bool, state: PartialState) -> dict:
    """Run one recipe unless ``folder`` holds a finished run of the same arguments; resume an interrupted one."""
    record_path = folder / STAGE_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    same = record is not None and record.get("argv") == argv
    if same and record.get("complete") and not overwrite and (folder / "training_summary.json").is_file():
        print(f"[{name}] reusing the finished run in {folder} (same arguments; --overwrite true retrains)")
        return json.loads((folder / "training_summary.json").read_text())
    extra: list[str] = []
    try:
        last = latest_checkpoint(folder) if same and not overwrite else None  # complete ones only
    except IncompleteCheckpoint as err:  # the job's own folder: restart the stage rather than stop
        print(f"[{name}] {err}: restarting the stage")
        last = None
    if last is not None:
        print(f"[{name}] resuming the interrupted run from {last}")
        extra = ["--resume_from_checkpoint", str(last)]
    elif state.is_main_process and folder.exists():
        if record is None and any(folder.iterdir()):
            raise SystemExit(f"{folder} exists and was not written by this job; choose another --output_dir")
        shutil.rmtree(folder)  # a run of other arguments: start clean, no stale checkpoints
    state.wait_for_everyone()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"argv": argv, "complete": False}, indent=2))
    print(f"[{name}] {shlex.join(argv + extra)}")
    summary = main(argv + extra)
    if state.is_main_process:
        record_path.write_text(json.dumps({"argv": argv, "complete": True}, indent=2))
    state.wait_for_everyone()
    return summary


# 2. Evaluation --------------------------------------------------------------------------------------------------
def evaluate(job: JobArguments, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    from mmkd.data.fashion_mnist import DEFAULT_TEMPLATES, fashion_mnist_classification
    from mmkd.eval.bias import gender_profession_bias
    from mmkd.eval.zeroshot import evaluate_zeroshot

    test = fashion_mnist_classification("test", data_dir=job.data_dir, max_examples=job.eval_max_examples)
    templates = [t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES]  # the captions' own 20 templates
    results = {}
    for name, folder in folders.items():
        start = time.time()
        zs = evaluate_zeroshot(str(folder), test, templates=templates, batch_size=job.eval_batch_size)
        bias = gender_profession_bias(str(folder), permutations=job.bias_permutations)
        results[name] = {"zeroshot": zs, "bias": bias, "eval_time_s": round(time.time() - start, 1)}
        print(f"[eval] {name}: acc@1 {100 * zs['acc1']:.2f} %, acc@5 {100 * zs['acc5']:.2f} % on "
              f"{zs['num_images']:,} test images ({results[name]['eval_time_s']} s)")
    return results


# 3. Report ------------------------------------------------------------------------------------------------------
def _layers(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    return f"{cfg['vision_config']['num_hidden_layers']}+{cfg['text_config']['num_hidden_layers']}"


def results_table(rows: list[dict[str, Any]]) -> str:
    from mmkd.reporting.tables import markdown_table, pct

    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    header = ("model", "layers (vision+text)", "parameters", "training steps", "training time (s)", "acc@1 (%)",
              "acc@5 (%)", "mean per-class recall (%)", "acc@1 / teacher's", "bias: WEAT d", "bias: ρ vs teacher")
    return markdown_table(header, [
        (r["model"], r["layers"], f"{r['parameters']:,}", r["steps"], f"{r['train_time_s']:.0f}", pct(r["acc1"]),
         pct(r["acc5"]), pct(r["mean_per_class_recall"]), f(r["acc1_of_teacher"], ".1%"), f(r["bias_effect_size"]),
         f(r["bias_spearman_vs_teacher"]))
        for r in rows
    ])


def report(job: JobArguments, folders: dict[str, Path], summaries: dict[str, dict], evals: dict[str, dict],
           command: str) -> dict[str, Any]:
    from mmkd.eval.bias import compare_bias
    from mmkd.reporting.cards import bias_summary, clip_student_card_data, render_clip_student_card
    from mmkd.reporting.plots import accuracy_bars, bias_plot, loss_curves

    out = Path(job.output_dir)
    teacher_acc1 = evals["teacher"]["zeroshot"]["acc1"]
    comparisons = {n: compare_bias(evals["teacher"]["bias"], evals[n]["bias"]) for n in ("distilled", "scratch")}
    rows = []
    for name, folder in folders.items():
        zs, summary = evals[name]["zeroshot"], summaries[name]
        params = summary["parameters"] if name == "teacher" else summary["student"]["parameters"]
        rows.append({
            "model": name, "path": str(folder), "layers": _layers(folder), "parameters": params["total"],
            "steps": summary["global_step"], "train_time_s": summary["wall_time_s"],
            "acc1": zs["acc1"], "acc5": zs["acc5"], "mean_per_class_recall": zs["mean_per_class_recall"],
            "acc1_of_teacher": None if name == "teacher" else zs["acc1"] / teacher_acc1,
            "bias_effect_size": evals[name]["bias"].effect_size,
            "bias_spearman_vs_teacher": comparisons[name]["spearman_rho"] if name in comparisons else None,
            "eval_time_s": evals[name]["eval_time_s"],
        })
    table = results_table(rows)
    plots = {
        "accuracy": accuracy_bars(rows, out / "zeroshot_accuracy.png").name,
        "losses": loss_curves(folders, out / "training_loss.png").name,
        "bias": bias_plot(evals["teacher"]["bias"], compare_to=evals["distilled"]["bias"], path=out / "bias.png",
                          labels=("teacher", "distilled")).name,
    }
    results = {
        "dataset": "fashion_mnist", "split": "test", "num_test_images": evals["teacher"]["zeroshot"]["num_images"],
        "templates": "the 20 caption templates of mmkd.data.fashion_mnist.DEFAULT_TEMPLATES",
        "models": rows,
        "bias": {"reports": {n: e["bias"].to_dict() for n, e in evals.items()}, "vs_teacher": comparisons,
                 "note": BIAS_NOTE},
        "job": asdict(job), "command": command, "plots": plots,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(
        f"# Offline main job: Fashion-MNIST zero-shot, test split ({results['num_test_images']:,} images)\n\n"
        f"{table}\n\nReproduce: `{command}`\n\n"
        "![accuracy](zeroshot_accuracy.png)\n![losses](training_loss.png)\n![bias](bias.png)\n\n"
        f"Bias: {BIAS_NOTE}\n"
    )
    for name in ("distilled", "scratch"):
        zs = evals[name]["zeroshot"]
        data = clip_student_card_data(
            folders[name],
            zeroshot=[{"dataset": "Fashion-MNIST", "dataset_type": "fashion_mnist", "split": "test",
                       "num_images": zs["num_images"], "acc1": zs["acc1"], "acc5": zs["acc5"],
                       "mean_per_class_recall": zs["mean_per_class_recall"], "teacher_acc1": teacher_acc1}],
            bias=bias_summary(comparisons[name], note=BIAS_NOTE),
            command=command,
            limitations=[
                "Trained and evaluated on 28x28 grey-scale Fashion-MNIST only: it knows ten clothing classes and "
                "nothing else; a demonstration of the distillation recipe, not a general-purpose CLIP.",
                "The zero-shot prompts are the templates its training captions were written from, so the "
                "evaluation measures image-caption matching on held-out images, not transfer to new wording.",
                "One training run (one seed) on a 2-core CPU; differences of a point or two are within seed noise.",
            ],
        )
        render_clip_student_card(data).save(folders[name] / "README.md")
    return results


# 4. The job -----------------------------------------------------------------------------------------------------
JOB_CHECKS = {
    "max_steps": optional(integer_at_least(1)), "max_train_samples": optional(integer_at_least(1)),
    "eval_max_examples": optional(integer_at_least(1)), "eval_batch_size": integer_at_least(1),
    "bias_permutations": integer_at_least(1), "scratch_learning_rate": optional(at_least(0)),
}


def validate(argv: list[str] | None = None) -> JobArguments:
    """Parse the job's options and check them and all three stages' before anything trains (the distilled and
    scratch stages' teacher is written by the first stage, so its path is not checked)."""
    (job,) = parse_args(argv, JobArguments)
    run_checks(job, JOB_CHECKS)
    for option in ("teacher_config", "student_config"):
        if not Path(getattr(job, option)).is_file():
            raise ConfigError(f"{option}={getattr(job, option)}: no such file")
    if job.data_dir is not None and not Path(job.data_dir).is_dir():
        raise ConfigError(f"data_dir={job.data_dir}: no such directory")
    argvs = stage_argvs(job)
    train_teacher.validate(argvs["teacher"])
    for name in ("distilled", "scratch"):
        clip_student.validate(argvs[name], check_teacher=False)
    return job


def main(argv: list[str] | None = None) -> dict[str, Any]:
    with config_errors():
        job = validate(argv)
    state = PartialState()
    command = "accelerate launch --num_processes 1 recipes/offline_job.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    start = time.time()
    folders = {name: Path(job.output_dir, name) for name in ("teacher", "distilled", "scratch")}
    recipes = {"teacher": train_teacher.main, "distilled": clip_student.main, "scratch": clip_student.main}
    summaries = {
        name: run_stage(name, recipes[name], argv_, folders[name], job.overwrite, state)
        for name, argv_ in stage_argvs(job).items()
    }
    results: dict[str, Any] = {}
    if state.is_main_process:
        evals = evaluate(job, folders)
        results = report(job, folders, summaries, evals, command)
        results["wall_time_s"] = round(time.time() - start, 1)
        Path(job.output_dir, "results.json").write_text(json.dumps(results, indent=2))
        print("\n" + results_table(results["models"]))
        print(f"\nresults, plots and model cards in {job.output_dir} ({results['wall_time_s']:.0f} s in all)")
    state.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
    shutdown()
