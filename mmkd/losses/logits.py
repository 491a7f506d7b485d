"""Logit-level distillation for CLIP students: Hinton KD on zero-shot class logits, and the teacher-free virtual
teacher on the contrastive logits.

**Zero-shot class logits.** When the training images carry class labels (Fashion-MNIST; any image folder with one
sub-folder per class), each model's logits for an image are its zero-shot classifier's:
``scale · cos(image embedding, class embedding)`` against one embedding per class, the normalised mean of the
class's prompt embeddings (``"a photo of a {c}."``; CLIP_benchmark's classifier, :func:`mmkd.eval.zeroshot.
zero_shot_classifier`). The teacher's class embeddings come from its own text tower, the student's from its own;
``scale`` is each model's exponentiated logit scale (CLIP's 100 for released models).

Hinton, Vinyals and Dean (2015) train the student on

    (1 − α) · CE(s, y) + α · T² · KL(softmax(t / T) ‖ softmax(s / T))

with ``s``, ``t`` the student's and the teacher's logits. **The T² convention** (their section 2): the gradient of
the soft term with respect to a logit scales like ``1 / T²``, so multiplying it by ``T²`` keeps the relative weight
of the hard and soft terms -- what ``α`` means -- unchanged when ``T`` changes. The KL is the mean over images
(``batchmean``). :func:`hinton_kd_loss` returns the two parts; the trainer's table weighs them ``(1 − α)·w`` and
``α·w`` as two logged terms, ``class_ce`` and ``class_kd``.

**The virtual teacher** (Yuan et al., 2020, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", Tf-KD_reg): a hand-made teacher that puts probability ``a`` on the correct class and spreads
``1 − a`` uniformly over the other ``K − 1``; softened by the temperature as a teacher's logits would be
(``softmax(log p / T)``, so ``T = 1`` is the distribution itself). For a CLIP batch the classes are the batch's
captions (image→text rows) and images (text→image rows), the correct one on the diagonal, and the term is
``T² · KL(p_virtual ‖ softmax(s / T))`` averaged over both directions -- the contrastive targets smoothed toward
uniform, the label-smoothing view of KD. With ``a = 1`` and ``T = 1`` it equals CLIP's InfoNCE. This is the paper's
form of a softened teacher (its logits ``log p`` over ``T``, the T² convention as for any teacher); the authors'
released code instead applies ``softmax(p / T)`` to the probabilities, leaves the student unsoftened and scales by a
multiplier. The two agree at ``T = 1``, which is what the studies use; at ``a = 1`` the target is one-hot at any
``T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import check_non_negative, check_positive
from mmkd.distributed import gather_with_grad
from mmkd.losses import LossInputs
from mmkd.losses.checks import check_matrix, require, upcast
from mmkd.losses.clip import HINTON_2015

__all__ = [
    "ClassCELoss",
    "ClassKDLoss",
    "VirtualTeacherLoss",
    "class_embeddings",
    "hinton_kd_loss",
    "soft_kl",
    "virtual_teacher_loss",
    "virtual_teacher_targets",
    "zero_shot_logits",
]

YUAN_2020 = """@inproceedings{yuan2020revisiting,
  title     = {Revisiting Knowledge Distillation via Label Smoothing Regularization},
  author    = {Yuan, Li and Tay, Francis E. H. and Li, Guilin and Wang, Tao and Feng, Jiashi},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {3903--3911},
  year      = {2020}
}"""


# --------------------------------------------------------------------------------------------------
# tensor-only functions
# --------------------------------------------------------------------------------------------------


def class_embeddings(prompt_embeds: Tensor, num_classes: int) -> Tensor:
    """``(C · K, E)`` prompt embeddings, class-major (class ``c``'s ``K`` templates in rows ``c·K … c·K + K − 1``)
    -> ``(C, E)``: each class's normalised mean of its normalised prompt embeddings (CLIP_benchmark's classifier)."""
    check_matrix("prompt_embeds", prompt_embeds)
    if num_classes < 1 or prompt_embeds.shape[0] % num_classes:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings do not split into {num_classes} classes")
    emb = F.normalize(upcast(prompt_embeds), dim=-1).view(num_classes, -1, prompt_embeds.shape[-1]).mean(dim=1)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(image_embeds: Tensor, class_embeds: Tensor, scale: Tensor | float) -> Tensor:
    """``scale · cos(image_i, class_c)``: ``(B, E)`` raw image embeddings against ``(C, E)`` class embeddings ->
    ``(B, C)`` logits. ``scale`` is the exponentiated logit scale (e.g. ``model.logit_scale.exp()``)."""
    check_matrix("image_embeds", image_embeds)
    check_matrix("class_embeds", class_embeds)
    if image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(f"image embeddings of width {image_embeds.shape[1]} against class embeddings of width "
                         f"{class_embeds.shape[1]}")
    return scale * F.normalize(upcast(image_embeds), dim=-1) @ F.normalize(upcast(class_embeds), dim=-1).T


def soft_kl(teacher_log_probs: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(p_teacher ‖ softmax(student / T))``, the mean over rows; ``teacher_log_probs`` are the target's
    log-probabilities, already softened by ``T``."""
    log_p_student = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p_teacher = teacher_log_probs.detach().to(log_p_student.dtype)
    p_teacher = log_p_teacher.exp()
    # 0 · log 0 = 0: a target with zero-probability classes (the virtual teacher at a = 1) stays finite
    kl = torch.where(p_teacher > 0, p_teacher * (log_p_teacher - log_p_student), 0.0).sum(dim=-1)
    return temperature**2 * kl.mean()


def hinton_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
                   ) -> tuple[Tensor, Tensor]:
    """Hinton et al. (2015): ``(CE(s, y), T² · KL(softmax(t / T) ‖ softmax(s / T)))``, each the mean over the
    ``B`` rows of the ``(B, C)`` logits; ``labels`` ``(B,)`` class indices. Weigh them ``1 − α`` and ``α``."""
    check_positive("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    ce = F.cross_entropy(upcast(student_logits), labels.long())
    kd = soft_kl(F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1), student_logits, temperature)
    return ce, kd


def virtual_teacher_targets(labels: Tensor, num_classes: int, a: float, temperature: float = 1.0) -> Tensor:
    """Yuan et al.'s virtual teacher as log-probabilities ``(B, K)``: ``a`` on each row's class, ``(1 − a) / (K − 1)``
    on every other, softened by ``T`` (``log_softmax(log p / T)``)."""
    if not 0 < a <= 1:
        raise ValueError(f"a={a}: the virtual teacher's probability of the correct class is in (0, 1]")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a virtual teacher needs at least 2 classes")
    check_positive("temperature", temperature)
    off = (1.0 - a) / (num_classes - 1)
    log_p = torch.full((labels.shape[0], num_classes), math.log(off) if off > 0 else -math.inf,
                       device=labels.device)  # a = 1: the other classes get probability exactly 0 at any T
    log_p.scatter_(1, labels.long().view(-1, 1), math.log(a))
    return F.log_softmax(log_p / temperature, dim=-1)


def virtual_teacher_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, a: float,
                         temperature: float = 1.0) -> Tensor:
    """The virtual teacher on a CLIP batch's contrastive logits (``logit_scale · cos``, ``(B, B)``, pairs on the
    diagonal): ``T² · KL(p_virtual ‖ softmax(s / T))`` for the image→text and the text→image rows, averaged."""
    check_matrix("image_embeds", image_embeds)
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs "
                         f"{tuple(text_embeds.shape)}")
    logits = zero_shot_logits(image_embeds, text_embeds, logit_scale)  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    target = virtual_teacher_targets(labels, logits.shape[0], a, temperature)
    return (soft_kl(target, logits, temperature) + soft_kl(target, logits.T, temperature)) / 2


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------


def _class_logits(inputs: LossInputs, side: str, module: str) -> Tensor:
    image = require(f"{side}_image", getattr(inputs, f"{side}_image"), module)
    classes = require(f"{side}_classes", getattr(inputs, f"{side}_classes"), module)
    scale_field = "logit_scale" if side == "student" else "teacher_logit_scale"
    scale = require(scale_field, getattr(inputs, scale_field), module)
    return zero_shot_logits(image, classes, scale)


class ClassCELoss(nn.Module):
    """``{"class_ce": weight · CE(student zero-shot logits, y)}``: the hard-label part of Hinton KD (the trainer
    weighs it ``(1 − α) · class_kd_weight``)."""

    citation = HINTON_2015
    terms = ("class_ce",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        logits = _class_logits(inputs, "student", "ClassCELoss")
        labels = require("class_labels", inputs.class_labels, "ClassCELoss")
        return {"class_ce": self.weight * F.cross_entropy(logits, labels.long().to(logits.device))}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class ClassKDLoss(nn.Module):
    """``{"class_kd": weight · T² · KL(softmax(t / T) ‖ softmax(s / T))}`` on the zero-shot class logits of student
    and teacher (the trainer weighs it ``α · class_kd_weight``); needs no labels."""

    citation = HINTON_2015
    terms = ("class_kd",)

    def __init__(self, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)
        self.temperature = check_positive("temperature", temperature)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        student = _class_logits(inputs, "student", "ClassKDLoss")
        teacher = _class_logits(inputs, "teacher", "ClassKDLoss").to(student.device)
        log_p_teacher = F.log_softmax(teacher.detach() / self.temperature, dim=-1)
        return {"class_kd": self.weight * soft_kl(log_p_teacher, student, self.temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"


class VirtualTeacherLoss(nn.Module):
    """``{"virtual_teacher": weight · virtual_teacher_loss(...)}`` over the global batch (gathered with gradients,
    as :class:`~mmkd.losses.clip.CLIPContrastiveLoss`): teacher-free KD, no teacher model."""

    citation = YUAN_2020
    terms = ("virtual_teacher",)

    def __init__(self, weight: float = 1.0, a: float = 0.9, temperature: float = 1.0, gather: bool = True) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)
        if not 0 < a <= 1:
            raise ValueError(f"a={a}: the virtual teacher's probability of the correct class is in (0, 1]")
        self.a = float(a)
        self.temperature = check_positive("temperature", temperature)
        self.gather = gather
        self.last_gathered_batch_size: int | None = None

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        image = require("student_image", inputs.student_image, "VirtualTeacherLoss")
        text = require("student_text", inputs.student_text, "VirtualTeacherLoss")
        scale = require("logit_scale", inputs.logit_scale, "VirtualTeacherLoss")
        if self.gather:
            image, text = gather_with_grad(image), gather_with_grad(text)
        self.last_gathered_batch_size = image.shape[0]
        return {"virtual_teacher": self.weight * virtual_teacher_loss(image, text, scale, self.a, self.temperature)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, a={self.a}, temperature={self.temperature}, gather={self.gather}"
