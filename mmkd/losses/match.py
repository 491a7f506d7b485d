"""Losses for distilling a binary image-text matcher (one logit per pair) into a smaller one.

Research 000 (section 3.3) distils a fine-tuned CLIP matcher, whose single logit ``t`` says whether an image and a
caption match (``t > 0``), into a ResNet + MiniLM student with a single logit ``s``. Its best objective is

    ``(1 − α)·BCE(σ(s), y) + α·BCE(σ(s/T), σ(t/T))``  with ``T = 3``, ``α = 0.5``,

i.e. Hinton et al.'s soft-target loss with the sigmoid in place of the softmax. The softmax form of the Hinton
recipe does not transfer to one logit: a softmax over a single class is identically 1, so its KL is identically 0
and so is its gradient. That form is kept (:func:`softmax_one_logit_distillation`) only to reproduce the ablation.

Two layers, as in :mod:`mmkd.losses`:

* tensor-only functions holding the maths; they accept logits of shape ``(B,)`` or ``(B, 1)``;
* parameter-free modules returning named, already-weighted terms: :class:`HardLabelLoss` (``hard``, weighted
  ``1 − α`` by the trainer), :class:`SoftLogitLoss` (``soft``, weighted ``α``) and :class:`FeatureDistillationLoss`
  (``image_feature`` / ``text_feature``). :class:`~mmkd.trainers.MatchDistillationConfig` builds them from its table.

Temperature convention: ``T`` *divides* both logits before the sigmoid (Hinton et al. 2015), so ``T > 1`` softens
the teacher's probability towards 0.5 and lets the student see how confident the teacher is, not only which side of
0 its logit falls on. The teacher is always a constant target: its logits and embeddings are detached.

Half-precision inputs are upcast to float32, as in :mod:`mmkd.losses`: a bf16 logit divided by T and put through a
sigmoid loses most of the teacher's soft information in an 8-bit mantissa.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import check_non_negative, check_positive
from mmkd.losses import LossInputs
from mmkd.losses.checks import require, same_pairs, upcast
from mmkd.losses.clip import HINTON_2015, embedding_mse

__all__ = [
    "DISTILL_FORMS",
    "FeatureDistillationLoss",
    "HardLabelLoss",
    "MatchDistillForm",
    "SoftLogitLoss",
    "hard_label_loss",
    "sigmoid_bce_distillation",
    "softmax_one_logit_distillation",
    "two_class_kl_distillation",
]

MatchDistillForm = Literal["sigmoid_bce", "kl_two_class", "softmax_one_logit"]

DISTILL_FORMS: tuple[str, ...] = get_args(MatchDistillForm)


# --------------------------------------------------------------------------------------------------
# tensor-only losses
# --------------------------------------------------------------------------------------------------


def hard_label_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Binary cross-entropy with logits against the labels, averaged over the pairs.

    This is the research's baseline objective and the ``(1 − α)`` term of the distillation loss. It is computed
    from the logit (log-sum-exp form), never from ``σ(s)``, so saturated logits give finite losses and gradients.

    Args:
        student_logits: ``(B,)`` or ``(B, 1)`` logits, ``> 0`` meaning "match".
        labels: ``(B,)`` or ``(B, 1)`` targets, 1 = match, 0 = mismatch, of any dtype (bool, int or float); values
            strictly between 0 and 1 act as soft targets. They are not range-checked, which would cost a device sync
            every step.

    Returns:
        Scalar loss.
    """
    s, y = same_pairs("student_logits", student_logits, "labels", labels)
    s = upcast(s)  # (B,)
    return F.binary_cross_entropy_with_logits(s, y.detach().to(s.dtype))


def sigmoid_bce_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The research's distillation term: ``BCE(σ(s/T), target = σ(t/T))``, averaged over the pairs.

    Computed stably as ``binary_cross_entropy_with_logits(s/T, σ(t/T))``. Its minimum over ``s`` is at ``s = t``
    (gradient ``(σ(s/T) − σ(t/T)) / (T·B)``, zero there), but its value there is the teacher's binary entropy
    ``H(σ(t/T))``, not 0: it equals :func:`two_class_kl_distillation` plus that constant, hence has the same gradient.

    Args:
        student_logits, teacher_logits: ``(B,)`` or ``(B, 1)`` logits (the teacher's are detached).
        temperature: ``T > 0`` dividing both logits.

    Returns:
        Scalar loss, *not* multiplied by ``T²`` (see :class:`SoftLogitLoss`).
    """
    temperature = check_positive("temperature", temperature)
    s, t = same_pairs("student_logits", student_logits, "teacher_logits", teacher_logits)
    target = torch.sigmoid(upcast(t).detach() / temperature)  # (B,) teacher's soft probability of "match"
    return F.binary_cross_entropy_with_logits(upcast(s) / temperature, target)


def two_class_kl_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's KL term with each logit read as a two-class distribution: ``KL(p_t || p_s)``, mean over pairs.

    ``p = [1 − σ(z/T), σ(z/T)]``, which is exactly ``softmax([0, z/T])``: a single logit is the difference of two
    class logits, so this is the standard recipe applied to the two-class problem the matcher really solves. It is
    0 when ``s = t`` and differs from :func:`sigmoid_bce_distillation` only by the teacher's entropy, a constant.

    Args:
        student_logits, teacher_logits: ``(B,)`` or ``(B, 1)`` logits (the teacher's are detached).
        temperature: ``T > 0`` dividing both logits.

    Returns:
        Scalar loss (``batchmean``: summed over the two classes, averaged over pairs), not multiplied by ``T²``.
    """
    temperature = check_positive("temperature", temperature)
    s, t = same_pairs("student_logits", student_logits, "teacher_logits", teacher_logits)
    s = upcast(s) / temperature  # (B,)
    t = upcast(t).detach() / temperature  # (B,)
    # log σ(−z) = log(1 − σ(z)) and log σ(z), both without ever forming 1 − σ(z) (which underflows).
    log_p_student = torch.stack([F.logsigmoid(-s), F.logsigmoid(s)], dim=-1)  # (B, 2)
    log_p_teacher = torch.stack([F.logsigmoid(-t), F.logsigmoid(t)], dim=-1)  # (B, 2)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def softmax_one_logit_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The form that failed in the research: KL between softmaxes taken over a *single* logit each.

    ``softmax([z/T]) = [1]`` for every ``z``, so both distributions are the point mass on the only class, the KL is
    identically 0 and so is its gradient with respect to the student's logit: the student learns nothing from the
    teacher. It is kept, still connected to the autograd graph (so ``backward`` runs and yields exact zeros), only
    to reproduce that ablation; :class:`SoftLogitLoss` warns when it is selected.

    Args:
        student_logits, teacher_logits: ``(B,)`` or ``(B, 1)`` logits (the teacher's are detached).
        temperature: ``T > 0`` dividing both logits.

    Returns:
        A scalar equal to 0.
    """
    temperature = check_positive("temperature", temperature)
    s, t = same_pairs("student_logits", student_logits, "teacher_logits", teacher_logits)
    log_p_student = F.log_softmax(upcast(s)[:, None] / temperature, dim=-1)  # (B, 1), all 0
    log_p_teacher = F.log_softmax(upcast(t).detach()[:, None] / temperature, dim=-1)  # (B, 1), all 0
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


# --------------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------------


_DISTILL_FNS = {
    "sigmoid_bce": sigmoid_bce_distillation,
    "kl_two_class": two_class_kl_distillation,
    "softmax_one_logit": softmax_one_logit_distillation,
}

_CITATION = HINTON_2015 + """
@misc{fysikoudi_kd_experiments,
  title  = {Knowledge distillation Experiments},
  author = {Fysikoudi, Eleni},
  note   = {University of Gothenburg. Research project whose binary image-text match distillation (sigmoid with
            temperature on both logits, BCE between the probabilities, T = 3, alpha = 0.5) mmkd implements}
}"""


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------


class HardLabelLoss(nn.Module):
    """``{"hard": weight · BCE(s, y)}``: the baseline objective and the ``(1 − α)`` term of distillation."""

    terms = ("hard",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        logits = require("student_logits", inputs.student_logits, "HardLabelLoss")
        labels = require("labels", inputs.labels, "HardLabelLoss")
        return {"hard": self.weight * hard_label_loss(logits, labels)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class SoftLogitLoss(nn.Module):
    """``{"soft": weight · [T²] · distill(s, t)}``: the student's logit against the teacher's (research 000 §3.3).

    ``form`` picks the distillation term: ``"sigmoid_bce"`` (the research's best with ``T = 3``, ``α = 0.5``:
    :func:`sigmoid_bce_distillation`), ``"kl_two_class"`` (:func:`two_class_kl_distillation`, same gradient,
    minimum 0) or ``"softmax_one_logit"`` (:func:`softmax_one_logit_distillation`, identically 0: ablation only,
    warns).

    Temperature convention: ``temperature`` divides both logits before the sigmoid (or softmax). The soft gradient
    scales like ``1/T²`` for large ``T`` (Hinton et al. 2015, section 2), so with ``t2_scaling=True`` the term is
    multiplied by ``T²`` and its gradient magnitude stays comparable across temperatures, which keeps ``α`` meaning
    the same thing in a temperature sweep. It is off by default, as in the research, whose ``α = 0.5``, ``T = 3``
    optimum was found without it.
    """

    citation = _CITATION
    terms = ("soft",)

    def __init__(
        self,
        weight: float = 0.5,
        temperature: float = 3.0,
        form: MatchDistillForm = "sigmoid_bce",
        t2_scaling: bool = False,
    ) -> None:
        super().__init__()
        if form not in DISTILL_FORMS:
            raise ValueError(f"form must be one of {DISTILL_FORMS}, got {form!r}")
        self.weight = check_non_negative("weight", weight)
        self.temperature = check_positive("temperature", temperature)
        self.form: MatchDistillForm = form
        self.t2_scaling = bool(t2_scaling)
        if form == "softmax_one_logit":
            warnings.warn(
                "distillation form 'softmax_one_logit' is identically zero (a softmax over one logit is always 1) "
                "and provides no learning signal from the teacher; it is kept only for the ablation. Use "
                "'sigmoid_bce' (or 'kl_two_class') to distil a binary matcher.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def scale(self) -> float:
        """The factor applied to the distillation term: ``weight·T²`` with ``t2_scaling``, else ``weight``."""
        return self.weight * (self.temperature**2 if self.t2_scaling else 1.0)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        logits = require("student_logits", inputs.student_logits, "SoftLogitLoss")
        teacher = require("teacher_logits", inputs.teacher_logits, "SoftLogitLoss")
        return {"soft": self.scale * _DISTILL_FNS[self.form](logits, teacher, self.temperature)}

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, temperature={self.temperature}, form={self.form!r}, t2_scaling={self.t2_scaling}"
        )


class FeatureDistillationLoss(nn.Module):
    """``{"image_feature", "text_feature"}``: weight · MSE between the student's projected image (text) features and
    the teacher's embeddings of the same input (:func:`~mmkd.losses.clip.embedding_mse`).

    The feature-matching alternative that research 000 (section 3.3, after Tran et al. 2021) describes next to
    logit matching; the student's projections to the teacher's width live on the student (``feature_projection_dim``)
    so that the optimizer and DDP see them. No temperature.
    """

    citation = _CITATION
    terms = ("image_feature", "text_feature")

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        terms = {}
        for tower in ("image", "text"):
            student = require(f"student_{tower}", getattr(inputs, f"student_{tower}"), "FeatureDistillationLoss")
            teacher = require(f"teacher_{tower}", getattr(inputs, f"teacher_{tower}"), "FeatureDistillationLoss")
            terms[f"{tower}_feature"] = self.weight * embedding_mse(student, teacher)
        return terms

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
