"""Losses for distilling a binary image-text matcher (one logit per pair) into a smaller one.

Research 000 (section 3.3) distils a fine-tuned CLIP matcher, whose single logit ``t`` says whether an image and a
caption match (``t > 0``), into a ResNet + MiniLM student with a single logit ``s``. Its best objective is

    ``(1 − α)·BCE(σ(s), y) + α·BCE(σ(s/T), σ(t/T))``  with ``T = 3``, ``α = 0.5``,

i.e. Hinton et al.'s soft-target loss with the sigmoid in place of the softmax. The softmax form of the Hinton
recipe does not transfer to one logit: a softmax over a single class is identically 1, so its KL is identically 0
and so is its gradient. That form is kept (:func:`softmax_one_logit_distillation`) only to reproduce the ablation.

Two layers, as in :mod:`mmkd.losses`:

* tensor-only functions holding the maths; they accept logits of shape ``(B,)`` or ``(B, 1)``;
* :class:`MatchDistillationLoss`, a parameter-free ``nn.Module`` returning a ``dict`` of named, already-weighted
  terms (terms whose weight is 0 are omitted); sum them with :func:`mmkd.losses.total_loss`.

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

__all__ = [
    "MatchDistillForm",
    "MatchDistillationLoss",
    "feature_distillation",
    "hard_label_loss",
    "sigmoid_bce_distillation",
    "softmax_one_logit_distillation",
    "two_class_kl_distillation",
]

MatchDistillForm = Literal["sigmoid_bce", "kl_two_class", "softmax_one_logit"]

_FORMS: tuple[str, ...] = get_args(MatchDistillForm)


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    """Return ``x`` in float32 unless it already is float32/float64 (see module docstring)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _as_logits(name: str, x: Tensor) -> Tensor:
    """``(B,)`` or ``(B, 1)`` -> ``(B,)``: a matcher's head may keep its output dimension of 1."""
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]  # (B,)
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) (one logit per pair), got {tuple(x.shape)}")
    return x


def _pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten both to ``(B,)`` and check they cover the same pairs."""
    flat_a, flat_b = _as_logits(name_a, a), _as_logits(name_b, b)
    if flat_a.shape != flat_b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return flat_a, flat_b


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _require(name: str, x: Tensor | None, reason: str) -> Tensor:
    if x is None:
        raise ValueError(f"MatchDistillationLoss requires {name} when {reason}, got None")
    return x


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
    s, y = _pair("student_logits", student_logits, "labels", labels)
    s = _upcast(s)  # (B,)
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
        Scalar loss, *not* multiplied by ``T²`` (see :class:`MatchDistillationLoss`).
    """
    temperature = _check_temperature(temperature)
    s, t = _pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    target = torch.sigmoid(_upcast(t).detach() / temperature)  # (B,) teacher's soft probability of "match"
    return F.binary_cross_entropy_with_logits(_upcast(s) / temperature, target)


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
    temperature = _check_temperature(temperature)
    s, t = _pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    s = _upcast(s) / temperature  # (B,)
    t = _upcast(t).detach() / temperature  # (B,)
    # log σ(−z) = log(1 − σ(z)) and log σ(z), both without ever forming 1 − σ(z) (which underflows).
    log_p_student = torch.stack([F.logsigmoid(-s), F.logsigmoid(s)], dim=-1)  # (B, 2)
    log_p_teacher = torch.stack([F.logsigmoid(-t), F.logsigmoid(t)], dim=-1)  # (B, 2)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def softmax_one_logit_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The form that failed in the research: KL between softmaxes taken over a *single* logit each.

    ``softmax([z/T]) = [1]`` for every ``z``, so both distributions are the point mass on the only class, the KL is
    identically 0 and so is its gradient with respect to the student's logit: the student learns nothing from the
    teacher. It is kept, still connected to the autograd graph (so ``backward`` runs and yields exact zeros), only
    to reproduce that ablation; :class:`MatchDistillationLoss` warns when it is selected.

    Args:
        student_logits, teacher_logits: ``(B,)`` or ``(B, 1)`` logits (the teacher's are detached).
        temperature: ``T > 0`` dividing both logits.

    Returns:
        A scalar equal to 0.
    """
    temperature = _check_temperature(temperature)
    s, t = _pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    log_p_student = F.log_softmax(_upcast(s)[:, None] / temperature, dim=-1)  # (B, 1), all 0
    log_p_teacher = F.log_softmax(_upcast(t).detach()[:, None] / temperature, dim=-1)  # (B, 1), all 0
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def feature_distillation(student_projected: Tensor, teacher_embeds: Tensor) -> Tensor:
    """Mean squared error over all elements between the student's projected features and the teacher's embeddings.

    The feature-matching alternative that research 000 (section 3.3, after Tran et al. 2021) describes next to logit
    matching: the student's image (or text) features, projected to the teacher's width, regress the teacher's
    embeddings of the same input. The teacher is detached. No temperature.

    Args:
        student_projected: ``(B, D)`` student features already projected to the teacher's width ``D``.
        teacher_embeds: ``(B, D)`` teacher embeddings.

    Returns:
        Scalar loss.
    """
    for name, x in (("student_projected", student_projected), ("teacher_embeds", teacher_embeds)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (batch, dim) tensor, got shape {tuple(x.shape)}")
    if student_projected.shape != teacher_embeds.shape:
        raise ValueError(
            "student_projected and teacher_embeds must have the same shape (project the student to the teacher's "
            f"width), got {tuple(student_projected.shape)} and {tuple(teacher_embeds.shape)}"
        )
    return F.mse_loss(_upcast(student_projected), _upcast(teacher_embeds).detach())


_DISTILL_FNS = {
    "sigmoid_bce": sigmoid_bce_distillation,
    "kl_two_class": two_class_kl_distillation,
    "softmax_one_logit": softmax_one_logit_distillation,
}


# --------------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------------


class MatchDistillationLoss(nn.Module):
    """``(1 − α)·BCE(s, y) + α·[T²]·distill(s, t) [+ feature terms]`` for a binary matcher (research 000 §3.3).

    Terms of the returned ``dict`` (each already weighted; a term whose weight is 0 is omitted):

    * ``"hard"``: ``(1 − α)·`` :func:`hard_label_loss` — omitted when ``α = 1``;
    * ``"soft"``: ``α·`` the distillation term chosen by ``form`` — omitted when ``α = 0``, and then
      ``teacher_logits`` is not needed:

      - ``"sigmoid_bce"`` (default, the research's best with ``T = 3``, ``α = 0.5``):
        :func:`sigmoid_bce_distillation`;
      - ``"kl_two_class"``: :func:`two_class_kl_distillation` (same gradient, minimum value 0);
      - ``"softmax_one_logit"``: :func:`softmax_one_logit_distillation`, identically 0 — ablation only, warns.

    * ``"image_feature"`` / ``"text_feature"``: ``feature_weight·`` :func:`feature_distillation` of the student's
      projected image/text features against the teacher's embeddings, when ``feature_weight > 0``.

    Temperature convention: ``temperature`` divides both logits before the sigmoid (or softmax); the hard term
    always uses ``T = 1``. The soft gradient scales like ``1/T²`` for large ``T`` (Hinton et al. 2015, section 2),
    so with ``t2_scaling=True`` the soft term is multiplied by ``T²`` and its gradient magnitude stays comparable
    across temperatures, which keeps ``α`` meaning the same thing in a temperature sweep. It is off by default, as in the
    research, whose ``α = 0.5``, ``T = 3`` optimum was found without it.
    """

    citation = """@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}
@misc{fysikoudi_kd_experiments,
  title  = {Knowledge distillation Experiments},
  author = {Fysikoudi, Eleni},
  note   = {University of Gothenburg. Research project whose binary image-text match distillation (sigmoid with
            temperature on both logits, BCE between the probabilities, T = 3, alpha = 0.5) mmkd implements}
}"""

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 3.0,
        form: MatchDistillForm = "sigmoid_bce",
        t2_scaling: bool = False,
        feature_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= alpha <= 1:  # also rejects NaN
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        if not feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}")
        self.alpha = float(alpha)
        self.temperature = _check_temperature(temperature)
        self.form: MatchDistillForm = form
        self.t2_scaling = bool(t2_scaling)
        self.feature_weight = float(feature_weight)
        if form == "softmax_one_logit":
            warnings.warn(
                "distillation form 'softmax_one_logit' is identically zero (a softmax over one logit is always 1) "
                "and provides no learning signal from the teacher; it is kept only for the ablation. Use "
                "'sigmoid_bce' (or 'kl_two_class') to distil a binary matcher.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def soft_scale(self) -> float:
        """The factor applied to the distillation term: ``α·T²`` with ``t2_scaling``, else ``α``."""
        return self.alpha * (self.temperature**2 if self.t2_scaling else 1.0)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None = None,
        student_image: Tensor | None = None,
        student_text: Tensor | None = None,
        teacher_image: Tensor | None = None,
        teacher_text: Tensor | None = None,
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.alpha < 1:
            terms["hard"] = (1 - self.alpha) * hard_label_loss(student_logits, labels)
        else:
            _pair("student_logits", student_logits, "labels", labels)  # shape errors do not depend on alpha
        if self.alpha > 0:
            teacher_logits = _require("teacher_logits", teacher_logits, f"alpha > 0 (alpha={self.alpha})")
            distill = _DISTILL_FNS[self.form](student_logits, teacher_logits, self.temperature)
            terms["soft"] = self.soft_scale * distill
        if self.feature_weight > 0:
            reason = f"feature_weight > 0 (feature_weight={self.feature_weight})"
            towers = (
                ("image", student_image, teacher_image),
                ("text", student_text, teacher_text),
            )
            for tower, student, teacher in towers:
                student = _require(f"student_{tower}", student, reason)
                teacher = _require(f"teacher_{tower}", teacher, reason)
                terms[f"{tower}_feature"] = self.feature_weight * feature_distillation(student, teacher)
        return terms

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, form={self.form!r}, "
            f"t2_scaling={self.t2_scaling}, feature_weight={self.feature_weight}"
        )
