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
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES_ENV = "MMKD_MODEL_CARDS"


def template_path(name: str) -> Path:
    """Path of the card template ``name`` (``clip_student.md``): ``$MMKD_MODEL_CARDS``, else the repository's
    ``model_cards/`` folder, else the copy shipped inside the package."""
    candidates = []
    if os.environ.get(TEMPLATES_ENV):
        candidates.append(Path(os.environ[TEMPLATES_ENV]) / name)
    candidates.append(Path(__file__).resolve().parent.parent / "model_cards" / name)
    candidates.append(Path(__file__).resolve().parent / "model_cards" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"model card template {name!r} not found; looked in: {', '.join(map(str, candidates))}")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_description() -> str:
    """One line naming the accelerator (or CPU) and core count this process runs on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU only ({cpu_name()}, {os.cpu_count()} cores)"


# Loss options of CLIPDistillationConfig -> the rows of the card's objective table.
_LOSS_ROWS = [
    ("triplet_weight", "`triplet_i2t`, `triplet_t2i`", "TripletLoss", "FaceNet triplet loss (Schroff et al., 2015)"),
    ("image_distill_weight", "`image_{distill_loss}`", "EmbeddingDistillationLoss",
     "embedding distillation (Hinton et al., 2015), per tower"),
    ("text_distill_weight", "`text_{distill_loss}`", "EmbeddingDistillationLoss",
     "embedding distillation (Hinton et al., 2015), per tower"),
    ("contrastive_weight", "`contrastive`", "CLIPContrastiveLoss", "CLIP's InfoNCE (Radford et al., 2021)"),
    ("affinity_weight", "`affinity`", "AffinityDistillationLoss", "CLIP-KD affinity mimicking (Yang et al., 2024)"),
]


def loss_rows(training_args: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The weighted loss terms of a run (from its ``training_config.json``) and the BibTeX of their sources."""
    from mmkd import losses as L

    rows, cites = [], []
    for key, terms, cls_name, source in _LOSS_ROWS:
        weight = float(training_args.get(key, 0.0) or 0.0)
        if weight <= 0:
            continue
        kind = training_args.get("distill_loss", "mse_cosine")
        rows.append({"terms": terms.format(distill_loss=kind.replace("_", "+")), "weight": weight, "source": source})
        citation = getattr(L, cls_name).citation
        if citation not in cites:
            cites.append(citation)
    return rows, "\n".join(cites)


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
    license: str | None = None
    limitations: list[str] = field(default_factory=list)

    @property
    def from_scratch(self) -> bool:
        return self.init.get("strategy") == "random"


_HYPERPARAMETERS = [
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
]


def _describe_data(data: dict[str, Any]) -> str:
    name = data.get("dataset_name")
    if name == "fashion_mnist":
        n = data.get("max_train_samples")
        subset = f"{n:,} images of the" if n else "the"
        return (f"Fashion-MNIST: {subset} training split (class-balanced), each captioned from its class name "
                "through one of 20 templates (`mmkd.data.fashion_mnist`)")
    if name == "conceptual_captions":
        return "Conceptual Captions (image-caption pairs; `mmkd.data.conceptual_captions`)"
    if name == "shapes":
        return "generated coloured shapes with captions (`mmkd.data.synthetic`; for tests and smoke runs)"
    return f"`{name}`"


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

    def read(name: str) -> dict[str, Any]:
        path = out / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {out} a folder written by recipes/clip_student.py?")
        return json.loads(path.read_text())

    config, summary, training = read("config.json"), read("training_summary.json"), read("training_config.json")
    init = config.get("distillation_init")
    if not init:
        raise ValueError(f"{out / 'config.json'} has no 'distillation_init': not an mmkd student")
    teacher = summary["teacher"]["name"]
    rows, citations = loss_rows(training)
    return CLIPStudentCard(
        model_name=out.name,
        repo_id=repo_id or str(out),
        teacher=teacher,
        teacher_parameters=summary["teacher"]["parameters"]["total"],
        teacher_vision_depth=init["teacher_vision_depth"],
        teacher_text_depth=init["teacher_text_depth"],
        vision_depth=config["vision_config"]["num_hidden_layers"],
        text_depth=config["text_config"]["num_hidden_layers"],
        parameters=summary["student"]["parameters"],
        init=init,
        training_data=_describe_data(summary.get("data", {})),
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
    )


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
        init_seed=data.hyperparameters.get("seed", "n/a"),
        has_teacher_scores=any(r.get("teacher_acc1") is not None for r in data.zeroshot),
        zeroshot_protocol="CLIP_benchmark's protocol: class embedding = normalised mean of the normalised "
        "template embeddings, logits = 100 · cosine",
    )
