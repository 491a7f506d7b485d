"""Distillation losses: tensor-only functions holding the maths, thin modules around them that return named terms.

Every loss module takes one :class:`LossInputs` (what the trainer computed for the batch; each term reads the
fields it needs) and returns ``{term name: weighted scalar}``. :class:`CombinedLoss` runs several and merges their
terms; :func:`total_loss` sums them. The trainers build the modules from their loss tables
(:mod:`mmkd.trainers.clip_distillation`, :mod:`mmkd.trainers.match_distillation`).

* :mod:`mmkd.losses.clip` -- triplet, embedding MSE / cosine, CLIP's contrastive loss, CLIP-KD's affinity term;
* :mod:`mmkd.losses.match` -- the binary matcher's hard-label BCE, the soft logit terms, the feature term;
* :mod:`mmkd.losses.features` -- hidden-state hints (FitNets), self-attention transfer (MiniLM) and SimKD's
  feature alignment;
* :mod:`mmkd.losses.logits` -- Hinton KD on zero-shot class logits and the teacher-free virtual teacher.

Teacher tensors are always constant targets (detached); half-precision inputs are upcast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

__all__ = ["CombinedLoss", "LossInputs", "total_loss"]


@dataclass
class LossInputs:
    """One batch as the loss terms see it. Embeddings are raw (not normalised) ``(B, E)`` rows; logits ``(B,)``."""

    student_image: Tensor | None = None  # (B, E) student image embeddings (a matcher: its projected image features)
    student_text: Tensor | None = None  # (B, E)
    logit_scale: Tensor | None = None  # () the student's exponentiated temperature multiplier (e.g. 100)
    teacher_image: Tensor | None = None  # (B, Et) teacher image embeddings
    teacher_text: Tensor | None = None  # (B, Et)
    student_logits: Tensor | None = None  # (B,) a matcher's one logit per pair
    teacher_logits: Tensor | None = None  # (B,)
    labels: Tensor | None = None  # (B,) 0/1 match labels
    # hidden-state hints (mmkd.losses.features): per tower, one tensor per hinted layer pair, the student's already
    # projected to the teacher's width; (B, N, D) for every token or (B, D) for the pooled one
    student_image_hints: list[Tensor] | None = None
    teacher_image_hints: list[Tensor] | None = None
    student_text_hints: list[Tensor] | None = None
    teacher_text_hints: list[Tensor] | None = None
    text_hint_mask: Tensor | None = None  # (B, T) 1 for real tokens (text hints over every token, attention rows)
    # attention transfer (mmkd.losses.features): per tower, (B, H, N, N) self-attention maps at mapped layers
    student_image_attentions: list[Tensor] | None = None
    teacher_image_attentions: list[Tensor] | None = None
    student_text_attentions: list[Tensor] | None = None
    teacher_text_attentions: list[Tensor] | None = None
    # SimKD (mmkd.losses.features): the student's pooled feature through its projector, the teacher's pre-projection one
    student_image_feature: Tensor | None = None  # (B, Dt)
    teacher_image_feature: Tensor | None = None
    student_text_feature: Tensor | None = None
    teacher_text_feature: Tensor | None = None
    # zero-shot class logits (mmkd.losses.logits): each model's (C, E) class embeddings, the images' class indices
    student_classes: Tensor | None = None  # (C, E) from the student's text tower, this step (with gradients)
    teacher_classes: Tensor | None = None  # (C, Et) from the teacher's, computed once
    class_labels: Tensor | None = None  # (B,) class index of each image
    teacher_logit_scale: Tensor | None = None  # () the teacher's exponentiated logit scale

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def total_loss(terms: dict[str, Tensor]) -> Tensor:
    """Sum the (already weighted) named terms returned by the loss modules."""
    if not terms:
        raise ValueError("total_loss needs at least one loss term, got an empty dict")
    return torch.stack([t.reshape(()) for t in terms.values()]).sum()


class CombinedLoss(nn.Module):
    """Run several loss modules on the same :class:`LossInputs` and merge their named terms.

    Duplicate term names raise ``ValueError`` rather than silently overwriting a term. Sum the result with
    :func:`total_loss`.
    """

    def __init__(self, losses: list[nn.Module]) -> None:
        super().__init__()
        if not losses:
            raise ValueError("CombinedLoss needs at least one loss module, got an empty list")
        for loss in losses:
            if not isinstance(loss, nn.Module):
                raise TypeError(f"CombinedLoss expects nn.Module losses, got {type(loss).__name__}")
        self.losses = nn.ModuleList(losses)

    @property
    def last_gathered_batch_size(self) -> int | None:
        """Largest row count seen after gathering by the member losses' last calls (None if none gathered)."""
        sizes = [s for loss in self.losses if (s := getattr(loss, "last_gathered_batch_size", None)) is not None]
        return max(sizes) if sizes else None

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        merged: dict[str, Tensor] = {}
        for loss in self.losses:
            terms = loss(inputs)
            duplicates = sorted(merged.keys() & terms.keys())
            if duplicates:
                raise ValueError(f"duplicate loss term names {duplicates} from {type(loss).__name__}")
            merged.update(terms)
        return merged
