"""Distil a binary CLIP matcher into a ResNet + MiniLM matcher with ``transformers.Trainer``.

Loss (research 000, best setting T = 3, α = 0.5): ``(1 − α)·BCE(s, y) + α·BCE(σ(s/T), σ(t/T))`` with the student
logit ``s``, the teacher logit ``t`` and the label ``y``, plus an optional feature term; the terms are the rows of
:data:`MATCH_LOSS_TERMS` (maths in :mod:`mmkd.losses.match`). The teacher (a :class:`~mmkd.teachers.MatcherTeacher`)
runs frozen and live, or not at all when the batch carries the embedding cache's ``teacher_image_embeds`` /
``teacher_text_embeds`` columns: they are put through the teacher's head. The teacher stage and the baseline are
this trainer with ``alpha=0`` and no teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmkd.checks import at_least, between, greater_than, one_of
from mmkd.losses.match import DISTILL_FORMS, FeatureDistillationLoss, HardLabelLoss, SoftLogitLoss
from mmkd.trainers.base import DistillationConfig, DistillationTrainer, LossTerm

__all__ = ["MATCH_LOSS_TERMS", "MatchDistillationConfig", "MatchDistillationTrainer"]

STUDENT_KEYS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")

_SOFT_FORMS = {
    "sigmoid_bce": "BCE between σ(s/T) and the teacher's σ(t/T), T = {T:g}",
    "kl_two_class": "KL between the two-class softmaxes of [0, s/T] and [0, t/T], T = {T:g}",
    "softmax_one_logit": "softmax over one logit (constant: no gradient; ablation only)",
}


def _soft_weight(a) -> str:
    return f"{a.alpha:g} × T² = {a.alpha * a.temperature**2:g}" if a.t2_scaling else f"{a.alpha:g}"


MATCH_LOSS_TERMS: dict[str, LossTerm] = {
    "hard": LossTerm(
        weight=lambda a: 1.0 - a.alpha,
        build=lambda a: HardLabelLoss(weight=1.0 - a.alpha),
        needs=frozenset({"student_logits", "labels"}),
        description="BCE-with-logits of the student's logit against the label",
        card_weight=lambda a: round(1.0 - a.alpha, 4),
    ),
    "soft": LossTerm(
        weight="alpha",
        build=lambda a: SoftLogitLoss(a.alpha, a.temperature, a.distill_form, a.t2_scaling),
        needs=frozenset({"student_logits", "teacher_logits"}),
        checks={"alpha": between(0, 1), "temperature": greater_than(0), "distill_form": one_of(*DISTILL_FORMS)},
        description=lambda a: _SOFT_FORMS[a.distill_form].format(T=a.temperature) + " (Hinton et al., 2015; Fysikoudi)",
        card_weight=_soft_weight,
    ),
    "feature": LossTerm(
        weight="feature_weight",
        build=lambda a: FeatureDistillationLoss(weight=a.feature_weight),
        needs=frozenset({"student_image", "student_text", "teacher_image", "teacher_text"}),
        checks={"feature_weight": at_least(0)},
        description="MSE between the student's projected features and the teacher's CLIP embeddings",
    ),
}


@dataclass
class MatchDistillationConfig(DistillationConfig):
    """Training arguments plus the loss of a match distillation run."""

    loss_terms: ClassVar = MATCH_LOSS_TERMS

    teacher_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The CLIP the teacher stage fine-tunes as a matcher: any mmkd teacher spec (open_clip "
                  "name, checkpoint, hf-hub:, transformers id or directory)."},
    )
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation term; 1 − alpha weighs the BCE "
                                                        "with the labels."})
    temperature: float = field(default=3.0, metadata={"help": "Divides both logits before the sigmoid (or softmax)."})
    distill_form: str = field(
        default="sigmoid_bce",
        metadata={"help": "sigmoid_bce (BCE between σ(s/T) and σ(t/T), the research's best), kl_two_class (KL "
                  "between the two-class distributions), softmax_one_logit (identically zero; ablation only)."},
    )
    t2_scaling: bool = field(default=False, metadata={"help": "Multiply the distillation term by T² (Hinton)."})
    feature_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the MSE between the student's projected features and the teacher's embeddings "
                  "(needs a student built with feature_projection_dim = the teacher's embedding size)."},
    )


class MatchDistillationTrainer(DistillationTrainer):
    """``Trainer`` for a matcher student with a frozen :class:`~mmkd.teachers.MatcherTeacher` ``teacher``.

    ``teacher`` may be ``None`` when every batch carries cached teacher embeddings, or when no term needs it (plain
    BCE training of the teacher stage and the baseline). Evaluation returns the student's logits, so
    ``compute_metrics=mmkd.eval.match_metrics.compute_metrics`` gives accuracy, precision, recall, F1 and ROC-AUC.
    """

    config_class: ClassVar = MatchDistillationConfig

    def __init__(self, model=None, teacher=None, args: MatchDistillationConfig = None, **kwargs):
        super().__init__(model=model, teacher=teacher, args=args, **kwargs)
        if "student_image" not in self.needed_inputs:
            # Feature projections without the feature term get no gradient, which would stall DDP.
            student = self.accelerator.unwrap_model(self.model)
            for name in ("image_projection", "text_projection"):
                if getattr(student, name, None) is not None:
                    getattr(student, name).requires_grad_(False)

    def teacher_inputs(self, inputs: dict) -> dict[str, Any]:
        if self.teacher is None:
            raise self.missing_teacher_error("teacher_image_embeds / teacher_text_embeds")
        teacher = self.accelerator.unwrap_model(self.teacher)
        if "teacher_image_embeds" in inputs and "teacher_text_embeds" in inputs:
            image, text = inputs["teacher_image_embeds"], inputs["teacher_text_embeds"]
            logits = teacher.logits_from_embeddings(image, text)
        else:
            shared_text = "teacher_input_ids" not in inputs  # the collator leaves out what the student shares
            out = teacher(
                pixel_values=inputs.get("teacher_pixel_values", inputs["pixel_values"]),
                input_ids=inputs["input_ids" if shared_text else "teacher_input_ids"],
                attention_mask=inputs.get("attention_mask" if shared_text else "teacher_attention_mask"),
            )
            logits, image, text = out.logits, out.image_embeds, out.text_embeds
        fields = {"teacher_logits": logits, "teacher_image": image, "teacher_text": text}
        return {k: v for k, v in fields.items() if k in self.needed_inputs}

    def student_inputs(self, model, inputs: dict) -> tuple[dict[str, Any], Any]:
        out = model(**{k: inputs[k] for k in STUDENT_KEYS if k in inputs})
        student = {
            "student_logits": out.logits,
            "labels": inputs["labels"],
            "student_image": getattr(out, "projected_image_embeds", None),
            "student_text": getattr(out, "projected_text_embeds", None),
        }
        return student, {"logits": out.logits}
