"""``MatchDistillationTrainer``: distil a binary CLIP matcher into a ResNet+MiniLM matcher.

Loss (research 000, best setting T = 3, α = 0.5): ``(1 − α)·BCE(s, y) + α·BCE(σ(s/T), σ(t/T))`` with the student
logit ``s``, the teacher logit ``t`` and the label ``y``; the other forms, T² scaling and the optional feature term
are options of :class:`MatchDistillationConfig` (see :mod:`mmkd.matching.losses`). The teacher's logits come live
(the teacher runs frozen, in eval mode, under ``no_grad``) or from the batch: a ``teacher_logits`` column, or the
embedding cache's ``teacher_image_embeds`` / ``teacher_text_embeds`` columns put through the teacher's head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from mmkd.losses import total_loss
from mmkd.matching.collator import TEACHER_LOGITS
from mmkd.matching.losses import MatchDistillationLoss
from mmkd.trainers.term_logging import LossTermLoggingMixin

STUDENT_KEYS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")


@dataclass
class MatchDistillationConfig(TrainingArguments):
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
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator reads the image and text columns."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.build_loss()  # validates alpha, temperature, form, feature_weight with errors naming the value

    def build_loss(self) -> MatchDistillationLoss:
        return MatchDistillationLoss(alpha=self.alpha, temperature=self.temperature, form=self.distill_form,
                                     t2_scaling=self.t2_scaling, feature_weight=self.feature_weight)


class MatchDistillationTrainer(LossTermLoggingMixin, Trainer):
    """``Trainer`` for the match student with a frozen CLIP matcher ``teacher``.

    ``teacher`` may be ``None`` when every batch carries ``teacher_logits`` (or when ``alpha`` is 0 and no
    feature term is used: plain BCE training of the baseline). Evaluation returns the student's logits, so
    ``compute_metrics=mmkd.matching.metrics.compute_metrics`` gives accuracy, precision, recall, F1 and ROC-AUC.
    """

    def __init__(self, model=None, teacher=None, args: MatchDistillationConfig = None, **kwargs):
        if not isinstance(args, MatchDistillationConfig):
            raise TypeError(f"args must be a MatchDistillationConfig, got {type(args).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        self.loss_fn = args.build_loss()
        self.loss_is_scaled_for_ga = False  # a mean over the micro-batch: Trainer divides by accumulation steps
        self.teacher = None
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    @property
    def needs_teacher(self) -> bool:
        return self.args.alpha > 0 or self.args.feature_weight > 0

    def _teacher_outputs(self, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(logits (B,), image embeddings, text embeddings) of the teacher; embeddings only when needed."""
        if not self.needs_teacher:
            return None, None, None
        if TEACHER_LOGITS in inputs and self.args.feature_weight == 0:
            return inputs[TEACHER_LOGITS], None, None
        if self.teacher is None:
            raise ValueError(
                "the loss needs the teacher (alpha > 0 or feature_weight > 0) but the trainer has no teacher and the "
                f"batch has no {TEACHER_LOGITS!r} column"
            )
        teacher = self.accelerator.unwrap_model(self.teacher)
        with torch.no_grad():
            if "teacher_image_embeds" in inputs and "teacher_text_embeds" in inputs:
                img, txt = inputs["teacher_image_embeds"], inputs["teacher_text_embeds"]
                return teacher.logits_from_embeddings(img, txt), img, txt
            out = teacher(
                pixel_values=inputs["teacher_pixel_values"],
                input_ids=inputs["teacher_input_ids"],
                attention_mask=inputs.get("teacher_attention_mask"),
            )
        return out.logits, out.image_embeds, out.text_embeds

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        t_logits, t_img, t_txt = self._teacher_outputs(inputs)
        # Call the (possibly DDP-wrapped) model itself so gradient synchronisation sees the forward.
        out = model(**{k: inputs[k] for k in STUDENT_KEYS if k in inputs})
        terms = self.loss_fn(
            out.logits,
            inputs["labels"],
            teacher_logits=t_logits,
            student_image=out.projected_image_embeds,
            student_text=out.projected_text_embeds,
            teacher_image=t_img,
            teacher_text=t_txt,
        )
        loss = total_loss(terms)
        if model.training:
            self.record_terms(terms)
        return (loss, {"logits": out.logits}) if return_outputs else loss
