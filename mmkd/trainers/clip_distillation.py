"""Distil a CLIP teacher into a (half-depth) CLIP student with ``transformers.Trainer``.

The loss is a weighted sum of named terms, each logged on its own:

* ``triplet_i2t`` / ``triplet_t2i`` - triplet loss between the student's image and text embeddings (its caption vs
  a non-matching caption of the batch), the research project's student objective;
* ``image_mse`` / ``image_cosine`` / ``text_mse`` / ``text_cosine`` - per-tower embedding distillation between
  student and teacher (MSE + cosine was the research's best);
* ``contrastive`` - CLIP's own InfoNCE on the student, with embeddings gathered across processes;
* ``affinity`` - CLIP-KD's soft image-text affinity distillation, gathered across processes.

The teacher is frozen and never saved; ``save_model`` writes only the student, a stock ``CLIPModel`` with its
processor. When a batch carries cached teacher embeddings the teacher is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from mmkd.losses import (
    AffinityDistillationLoss,
    CLIPContrastiveLoss,
    CLIPDistillationLoss,
    EmbeddingDistillationLoss,
    TripletLoss,
    total_loss,
)
from mmkd.students.half_depth import STRATEGIES
from mmkd.teachers import BACKENDS, CLIPTeacher
from mmkd.trainers.term_logging import LossTermLoggingMixin

DISTILL_KINDS = ("mse_cosine", "mse", "cosine")
NEGATIVES = ("hardest", "random")


@dataclass
class CLIPDistillationConfig(TrainingArguments):
    """Training arguments plus the teacher, the student and the loss of a CLIP distillation run."""

    # -- teacher ----------------------------------------------------------------------------------------------
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: an open_clip model name (ViT-B-32), hf-hub:org/repo, local-dir:/path, an open_clip "
            "model config *.json, or a transformers CLIPModel hub id / directory. None trains without a teacher."
        },
    )
    teacher_pretrained: str | None = field(
        default=None,
        metadata={"help": "open_clip only: pretrained tag (laion2b_s34b_b79k, openai) or local checkpoint path."},
    )
    teacher_backend: str = field(default="auto", metadata={"help": f"One of {', '.join(BACKENDS)}."})
    # -- student ----------------------------------------------------------------------------------------------
    student_vision_layers: int | None = field(
        default=None, metadata={"help": "Student vision depth; default half the teacher's, rounded up."}
    )
    student_text_layers: int | None = field(
        default=None, metadata={"help": "Student text depth; default half the teacher's, rounded up."}
    )
    student_init: str = field(
        default="every_other",
        metadata={"help": f"Which teacher layers the student copies: {', '.join(STRATEGIES)} (random: from scratch)."},
    )
    # -- loss ---------------------------------------------------------------------------------------------------
    triplet_weight: float = field(default=1.0, metadata={"help": "Weight of each triplet direction (0 disables)."})
    triplet_margin: float = field(default=0.2, metadata={"help": "Triplet margin, in cosine similarity."})
    triplet_negatives: str = field(
        default="hardest", metadata={"help": "Negative caption / image per anchor: hardest or random in the batch."}
    )
    triplet_symmetric: bool = field(default=True, metadata={"help": "Add the text->image triplet direction."})
    distill_loss: str = field(
        default="mse_cosine", metadata={"help": f"Embedding distillation: {', '.join(DISTILL_KINDS)}."}
    )
    image_distill_weight: float = field(default=1.0, metadata={"help": "Weight of the image-tower distillation."})
    text_distill_weight: float = field(default=1.0, metadata={"help": "Weight of the text-tower distillation."})
    contrastive_weight: float = field(default=0.0, metadata={"help": "Weight of CLIP's InfoNCE on the student."})
    affinity_weight: float = field(default=0.0, metadata={"help": "Weight of CLIP-KD's affinity distillation."})
    affinity_temperature: float = field(
        default=0.05, metadata={"help": "Temperature dividing cosine similarities in the affinity term."}
    )
    gather_across_processes: bool = field(
        default=True, metadata={"help": "Gather embeddings over processes (with gradients) for batch-wide terms."}
    )
    # -- Trainer defaults that differ for image-text data -------------------------------------------------------
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image and text columns for the collator."}
    )

    def __post_init__(self):
        if self.teacher_backend not in BACKENDS:
            raise ValueError(f"teacher_backend={self.teacher_backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.student_init not in STRATEGIES:
            raise ValueError(f"student_init={self.student_init!r}; choose one of {', '.join(STRATEGIES)}")
        if self.triplet_negatives not in NEGATIVES:
            raise ValueError(f"triplet_negatives={self.triplet_negatives!r}; choose one of {', '.join(NEGATIVES)}")
        if self.distill_loss not in DISTILL_KINDS:
            raise ValueError(f"distill_loss={self.distill_loss!r}; choose one of {', '.join(DISTILL_KINDS)}")
        for name in (
            "triplet_weight",
            "image_distill_weight",
            "text_distill_weight",
            "contrastive_weight",
            "affinity_weight",
            "triplet_margin",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.affinity_temperature <= 0:
            raise ValueError(f"affinity_temperature={self.affinity_temperature} must be > 0")
        for name in ("student_vision_layers", "student_text_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not any(
            getattr(self, n) > 0
            for n in (
                "triplet_weight",
                "image_distill_weight",
                "text_distill_weight",
                "contrastive_weight",
                "affinity_weight",
            )
        ):
            raise ValueError("every loss weight is 0: nothing to train")
        if self.ddp_find_unused_parameters is None:
            # Every student parameter gets a gradient unless only one tower is distilled; DDP's search for
            # unused parameters is an extra graph traversal per step, so it is on only when it is needed.
            both_towers = (
                self.triplet_weight > 0
                or self.contrastive_weight > 0
                or self.affinity_weight > 0
                or (self.image_distill_weight > 0 and self.text_distill_weight > 0)
            )
            self.ddp_find_unused_parameters = not both_towers
        super().__post_init__()

    @property
    def needs_teacher(self) -> bool:
        """Whether any loss term reads the teacher's embeddings."""
        return self.image_distill_weight > 0 or self.text_distill_weight > 0 or self.affinity_weight > 0


def build_loss(args: CLIPDistillationConfig) -> CLIPDistillationLoss:
    losses: list[nn.Module] = []
    if args.triplet_weight > 0:
        losses.append(
            TripletLoss(
                margin=args.triplet_margin,
                negatives=args.triplet_negatives,
                weight=args.triplet_weight,
                symmetric=args.triplet_symmetric,
                seed=args.seed,
            )
        )
    if args.image_distill_weight > 0 or args.text_distill_weight > 0:
        losses.append(
            EmbeddingDistillationLoss(
                kind=args.distill_loss, image_weight=args.image_distill_weight, text_weight=args.text_distill_weight
            )
        )
    if args.contrastive_weight > 0:
        losses.append(CLIPContrastiveLoss(weight=args.contrastive_weight, gather=args.gather_across_processes))
    if args.affinity_weight > 0:
        losses.append(
            AffinityDistillationLoss(
                temperature=args.affinity_temperature,
                weight=args.affinity_weight,
                gather=args.gather_across_processes,
            )
        )
    return CLIPDistillationLoss(losses)


class CLIPDistillationTrainer(LossTermLoggingMixin, Trainer):
    """``Trainer`` that distils a frozen CLIP ``teacher`` into the ``model`` (a ``CLIPModel`` student).

    Args:
        model: the student ``CLIPModel``.
        teacher: a frozen :class:`mmkd.teachers.CLIPTeacher`, or ``None`` when no term needs one (or every batch
            carries cached teacher embeddings).
        args: a :class:`CLIPDistillationConfig`.
        Everything else is passed to ``Trainer``.
    """

    def __init__(self, model=None, teacher: CLIPTeacher | None = None, args: CLIPDistillationConfig = None, **kwargs):
        if not isinstance(args, CLIPDistillationConfig):
            raise TypeError(f"args must be a CLIPDistillationConfig, got {type(args).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        self.loss_fn = build_loss(args)
        # The loss is a mean over the micro-batch: let Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        if args.contrastive_weight == 0:
            # Only InfoNCE reads the student's temperature; a parameter with no gradient would stall DDP.
            self.accelerator.unwrap_model(self.model).logit_scale.requires_grad_(False)
        self.teacher = None
        if teacher is not None:
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.gathered_batch_size: int | None = None

    # -- teacher ----------------------------------------------------------------------------------------------
    def _teacher_embeddings(self, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.args.needs_teacher:
            return None, None
        t_img = inputs.get("teacher_image_embeds")
        t_txt = inputs.get("teacher_text_embeds")
        if t_img is not None and t_txt is not None:
            return t_img, t_txt
        if self.teacher is None:
            raise ValueError(
                "The loss needs teacher embeddings but the trainer has no teacher and the batch has no "
                "teacher_image_embeds / teacher_text_embeds columns."
            )
        pixel_values = None if t_img is not None else inputs.get("teacher_pixel_values", inputs["pixel_values"])
        if t_txt is not None:
            input_ids = attention_mask = None
        elif "teacher_input_ids" in inputs:
            input_ids, attention_mask = inputs["teacher_input_ids"], inputs.get("teacher_attention_mask")
        else:  # the teacher shares the student's tokenizer
            input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        out = self.teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        return (
            t_img if t_img is not None else out.image_embeds,
            t_txt if t_txt is not None else out.text_embeds,
        )

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        t_img, t_txt = self._teacher_embeddings(inputs)
        # Call the (possibly DDP-wrapped) model itself so gradient synchronisation sees the forward.
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            pixel_values=inputs["pixel_values"],
            return_dict=True,
        )
        student = self.accelerator.unwrap_model(model)
        # transformers 5's CLIPModel returns normalised image_embeds / text_embeds, and the raw projections
        # (what MSE distillation compares) as the towers' pooler_output.
        s_img = outputs.vision_model_output.pooler_output  # (B, E)
        s_txt = outputs.text_model_output.pooler_output  # (B, E)
        terms = self.loss_fn(
            student_image=s_img,
            student_text=s_txt,
            teacher_image=None if t_img is None else t_img.to(s_img.dtype),
            teacher_text=None if t_txt is None else t_txt.to(s_txt.dtype),
            logit_scale=student.logit_scale.exp(),
        )
        loss = total_loss(terms)
        if model.training:
            self.record_terms(terms)
            if self.loss_fn.last_gathered_batch_size is not None:
                self.gathered_batch_size = self.loss_fn.last_gathered_batch_size
        return (loss, outputs) if return_outputs else loss

    def extra_logs(self) -> dict[str, float]:
        return {} if self.gathered_batch_size is None else {"gathered_batch_size": self.gathered_batch_size}
