"""Losses for distilling a CLIP teacher into a CLIP student.

Tensor-only functions (:func:`triplet_loss`, :func:`embedding_mse`, :func:`cosine_distance`,
:func:`clip_contrastive_loss`, :func:`affinity_distillation_loss`) hold the maths. They take raw, un-normalised
projected embeddings of shape ``(B, D)``, normalise internally where the loss is defined on the unit sphere, and
never communicate, so they work equally on a local batch or on one gathered across processes. Thin modules without
trainable parameters read what they need from a :class:`~mmkd.losses.LossInputs` and return a ``dict`` of named,
already-weighted terms; the batch-level ones (contrastive, affinity) gather across processes first.

Teacher embeddings are constant targets: the functions detach them, so no gradient reaches a teacher even if it was
run with autograd enabled. Half-precision inputs are upcast to float32 (:func:`mmkd.losses.checks.upcast`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import check_non_negative, check_positive
from mmkd.distributed import gather_no_grad, gather_with_grad, local_rows
from mmkd.losses import LossInputs
from mmkd.losses.checks import check_same_shape, require, upcast

__all__ = [
    "AffinityDistillationLoss",
    "CLIPContrastiveLoss",
    "EmbeddingDistillationLoss",
    "TripletLoss",
    "affinity_distillation_loss",
    "clip_contrastive_loss",
    "cosine_distance",
    "embedding_mse",
    "mine_negatives",
    "triplet_loss",
]

HINTON_2015 = """@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}"""

NegativeMining = Literal["hardest", "random"]
EmbeddingDistillationKind = Literal["mse_cosine", "mse", "cosine"]

_NEGATIVE_MODES = ("hardest", "random")
_EMBEDDING_KINDS = ("mse_cosine", "mse", "cosine")


# --------------------------------------------------------------------------------------------------
# tensor-only losses
# --------------------------------------------------------------------------------------------------


def mine_negatives(
    anchor: Tensor,
    candidates: Tensor,
    negatives: NegativeMining = "hardest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick, for every anchor ``i``, the index ``j != i`` of its negative among ``candidates``.

    ``candidates[i]`` is anchor ``i``'s own positive, hence excluded.

    Args:
        anchor: ``(B, D)`` raw embeddings.
        candidates: ``(B, D)`` raw embeddings.
        negatives: ``"hardest"`` — the candidate with the highest cosine to the anchor (first index
            on ties); ``"random"`` — uniform over the ``B - 1`` other candidates.
        generator: RNG for ``"random"``; indices are drawn on the generator's device (CPU when
            ``None``, using the global CPU RNG), so a seeded CPU generator reproduces the same
            negatives on any accelerator.

    Returns:
        ``(B,)`` int64 indices on ``anchor.device``. Never differentiable.
    """
    if negatives not in _NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {_NEGATIVE_MODES}, got {negatives!r}")
    check_same_shape("anchor", anchor, "candidates", candidates)
    batch_size = anchor.shape[0]
    if batch_size < 2:
        raise ValueError(
            f"triplet negatives need a batch of at least 2 (one other row), got batch size {batch_size}"
        )
    with torch.no_grad():
        if negatives == "hardest":
            a = F.normalize(upcast(anchor), dim=-1)  # (B, D)
            c = F.normalize(upcast(candidates), dim=-1)  # (B, D)
            sim = a @ c.T  # (B, B)
            # -inf on the diagonal so the positive can never be chosen, whatever its cosine.
            eye = torch.eye(batch_size, dtype=torch.bool, device=sim.device)  # (B, B)
            return sim.masked_fill(eye, float("-inf")).argmax(dim=1)  # (B,)
        device = generator.device if generator is not None else torch.device("cpu")
        # Draw r in [0, B-2] and skip over i: j = r + (r >= i) is uniform over {0..B-1} \ {i}.
        offsets = torch.randint(0, batch_size - 1, (batch_size,), generator=generator, device=device)  # (B,)
        rows = torch.arange(batch_size, device=device)  # (B,)
        return (offsets + (offsets >= rows).long()).to(anchor.device)  # (B,)


def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    candidates: Tensor,
    margin: float = 0.2,
    negatives: NegativeMining = "hardest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Cosine triplet loss with in-batch negatives (Schroff et al., FaceNet, CVPR 2015).

    ``loss_i = relu(margin - cos(a_i, p_i) + cos(a_i, n_i))``, averaged over ``i``, where ``p_i =
    positive[i]`` and ``n_i = candidates[j]`` for a ``j != i`` chosen by :func:`mine_negatives`.
    FaceNet uses squared Euclidean distances; on L2-normalised embeddings ``||a - b||^2 = 2 - 2 cos``,
    so FaceNet's loss with margin ``alpha`` is exactly twice this one with ``margin = alpha / 2``. No
    temperature is involved; the margin is in cosine units (meaningful range [0, 2]).

    For image→text distillation pass ``(student_image, student_text, student_text)``: each image is
    pulled towards its caption and pushed from a non-matching caption of the batch. Text→image is the
    same call with the roles swapped.

    Args:
        anchor, positive, candidates: ``(B, D)`` raw embeddings (normalised here).
        margin: required gap between the positive and the negative cosine.
        negatives: ``"hardest"`` or ``"random"``; see :func:`mine_negatives`.
        generator: RNG for ``"random"`` negatives.

    Returns:
        Scalar loss.
    """
    check_same_shape("anchor", anchor, "positive", positive)
    neg_idx = mine_negatives(anchor, candidates, negatives, generator)  # (B,)
    a = F.normalize(upcast(anchor), dim=-1)  # (B, D)
    p = F.normalize(upcast(positive), dim=-1)  # (B, D)
    n = F.normalize(upcast(candidates), dim=-1)[neg_idx]  # (B, D)
    pos_cos = (a * p).sum(dim=-1)  # (B,)
    neg_cos = (a * n).sum(dim=-1)  # (B,)
    return F.relu(margin - pos_cos + neg_cos).mean()


def embedding_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over all elements of raw student vs teacher embeddings.

    Feature-mimicking distillation in the sense of Hinton et al., "Distilling the Knowledge in a
    Neural Network" (2015), applied to embeddings as in "Analyzing Student Models in Multi-Modal
    Knowledge Distillation". No temperature. The teacher is detached.

    Args:
        student, teacher: ``(B, D)`` raw embeddings of the same width (project the student first).
    """
    check_same_shape("student", student, "teacher", teacher)
    return F.mse_loss(upcast(student), upcast(teacher).detach())


def cosine_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of ``1 - cos(s_i, t_i)``: direction-only embedding distillation.

    Complements :func:`embedding_mse` (Hinton et al. 2015; "Analyzing Student Models in Multi-Modal
    Knowledge Distillation"): it ignores norms, which CLIP discards at retrieval time anyway. No
    temperature. The teacher is detached. Range [0, 2].

    Args:
        student, teacher: ``(B, D)`` raw embeddings of the same width.
    """
    check_same_shape("student", student, "teacher", teacher)
    cos = F.cosine_similarity(upcast(student), upcast(teacher).detach(), dim=-1)  # (B,)
    return (1.0 - cos).mean()


def clip_contrastive_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, rows: slice | None = None
) -> Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al., "Learning Transferable Visual Models From
    Natural Language Supervision", ICML 2021).

    ``logits = logit_scale * norm(img) @ norm(txt).T`` with matching pairs on the diagonal; the loss is
    ``(CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2``.

    Temperature convention: ``logit_scale`` is the *already exponentiated* multiplier, i.e. ``1 / T``
    (e.g. ``100.0``, or ``model.logit_scale.exp()`` for a CLIP model that stores it in log space as
    HF's ``CLIPModel`` and open_clip do). It is not exponentiated here. A tensor with
    ``requires_grad`` receives a gradient, so a learnable temperature keeps training.

    Local loss (open_clip's ``--local-loss``): with ``rows``, only those pairs' images and captions (this rank's,
    of a gathered batch) are scored against every caption and image of the batch, and the loss is their mean:
    ``O(b * B)`` memory instead of ``O(B^2)``. The ranks' local losses sum to ``world_size`` times the global one,
    so with :func:`~mmkd.distributed.gather_with_grad` (whose backward sums every rank's gradient) each rank's
    embeddings get today's gradient exactly.

    Args:
        image_embeds, text_embeds: ``(B, D)`` raw embeddings, possibly gathered across processes.
        logit_scale: positive float or 0-d tensor.
        rows: optional slice of the ``B`` rows whose loss is computed (default: all, as one ``B x B`` matrix).
    """
    check_same_shape("image_embeds", image_embeds, "text_embeds", text_embeds)
    img = F.normalize(upcast(image_embeds), dim=-1)  # (B, D)
    txt = F.normalize(upcast(text_embeds), dim=-1)  # (B, D)
    if rows is not None:
        labels = torch.arange(img.shape[0], device=img.device)[rows]  # (b,): the pairs' columns
        image_to_text = logit_scale * img[rows] @ txt.T  # (b, B)
        text_to_image = logit_scale * txt[rows] @ img.T  # (b, B)
        return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2
    logits = logit_scale * img @ txt.T  # (B, B); row i = image i against every caption
    labels = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _row_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of ``KL(softmax(teacher) || softmax(student))``, both taken in log space."""
    log_p_teacher = F.log_softmax(teacher_logits, dim=-1)  # (B, B)
    log_p_student = F.log_softmax(student_logits, dim=-1)  # (B, B)
    # batchmean divides the summed KL by the number of rows, i.e. the mean per-row KL.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def affinity_distillation_loss(
    student_image: Tensor,
    student_text: Tensor,
    teacher_image: Tensor,
    teacher_text: Tensor,
    temperature: float = 0.05,
    rows: slice | None = None,
) -> Tensor:
    """Contrastive relational distillation (CRD) of Yang et al., "CLIP-KD: An Empirical Study of CLIP
    Model Distillation", CVPR 2024.

    Each row of the image→text affinity matrix, ``p_i = softmax(cos(img_i, txt_j)_j / temperature)``,
    is a distribution over the batch's captions. The student's rows are matched to the teacher's with
    ``KL(p_teacher || p_student)`` averaged over rows; the same is done for text→image rows (the
    transposed matrices) and the two directions are averaged, as in CLIP-KD's ``ckd_loss``.

    Temperature convention: ``temperature`` *divides* cosine similarities, so ``0.01`` equals CLIP's
    logit scale of 100. CLIP-KD scales each model's cosines by its own learned logit scale instead; a
    single fixed temperature keeps the target independent of the student's temperature. The KL is not
    multiplied by ``temperature ** 2`` (CLIP-KD uses T = 1 on pre-scaled logits, so neither does it).

    Only ``B x B`` matrices are compared, so student and teacher widths may differ. The teacher is
    detached; the loss is exactly 0 when student and teacher embeddings coincide.

    Args:
        student_image, student_text: ``(B, Ds)`` raw student embeddings (possibly gathered).
        teacher_image, teacher_text: ``(B, Dt)`` raw teacher embeddings (possibly gathered).
        temperature: positive softmax temperature.
        rows: optional slice of the ``B`` rows whose image->text and text->image rows are compared (a local loss,
            as in :func:`clip_contrastive_loss`); default all.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_same_shape("student_image", student_image, "student_text", student_text)
    check_same_shape("teacher_image", teacher_image, "teacher_text", teacher_text)
    if student_image.shape[0] != teacher_image.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {student_image.shape[0]} vs {teacher_image.shape[0]}"
        )
    s_img = F.normalize(upcast(student_image), dim=-1)  # (B, Ds)
    s_txt = F.normalize(upcast(student_text), dim=-1)  # (B, Ds)
    t_img = F.normalize(upcast(teacher_image).detach(), dim=-1)  # (B, Dt)
    t_txt = F.normalize(upcast(teacher_text).detach(), dim=-1)  # (B, Dt)
    if rows is not None:  # (b, B) rows of each direction instead of one (B, B) matrix
        image_to_text = _row_kl(t_img[rows] @ t_txt.T / temperature, s_img[rows] @ s_txt.T / temperature)
        text_to_image = _row_kl(t_txt[rows] @ t_img.T / temperature, s_txt[rows] @ s_img.T / temperature)
        return (image_to_text + text_to_image) / 2
    student_logits = s_img @ s_txt.T / temperature  # (B, B); rows: images, columns: captions
    teacher_logits = t_img @ t_txt.T / temperature  # (B, B)
    image_to_text = _row_kl(teacher_logits, student_logits)
    text_to_image = _row_kl(teacher_logits.T, student_logits.T)
    return (image_to_text + text_to_image) / 2


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------


class TripletLoss(nn.Module):
    """Student-only cosine triplet loss over the local batch (FaceNet, Schroff et al. 2015).

    Returns ``{"triplet_i2t": ...}`` (image anchors, caption positives/negatives) and, when
    ``symmetric``, ``{"triplet_t2i": ...}`` (caption anchors, image positives/negatives), each
    multiplied by ``weight``. Negatives come from the *local* batch: no gathering, so the loss is a
    per-row mean that DDP's gradient averaging already turns into a global mean.

    ``seed`` makes ``"random"`` negatives reproducible through a private CPU generator; without it
    the global torch RNG is used (seeded by ``transformers.set_seed``/``accelerate.utils.set_seed``).
    The margin is in cosine units; there is no temperature.
    """

    citation = """@inproceedings{schroff2015facenet,
  title     = {FaceNet: A Unified Embedding for Face Recognition and Clustering},
  author    = {Schroff, Florian and Kalenichenko, Dmitry and Philbin, James},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {815--823},
  year      = {2015}
}"""

    def __init__(
        self,
        margin: float = 0.2,
        negatives: NegativeMining = "hardest",
        weight: float = 1.0,
        symmetric: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if negatives not in _NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {_NEGATIVE_MODES}, got {negatives!r}")
        self.margin = float(margin)
        self.negatives: NegativeMining = negatives
        self.weight = check_non_negative("weight", weight)
        self.symmetric = symmetric
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def terms(self) -> tuple[str, ...]:
        return ("triplet_i2t", "triplet_t2i") if self.symmetric else ("triplet_i2t",)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        image = require("student_image", inputs.student_image, "TripletLoss")
        text = require("student_text", inputs.student_text, "TripletLoss")
        terms = {
            "triplet_i2t": self.weight * triplet_loss(image, text, text, self.margin, self.negatives, self.generator)
        }
        if self.symmetric:
            terms["triplet_t2i"] = self.weight * triplet_loss(
                text, image, image, self.margin, self.negatives, self.generator
            )
        return terms

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, negatives={self.negatives!r}, weight={self.weight}, "
            f"symmetric={self.symmetric}"
        )


class EmbeddingDistillationLoss(nn.Module):
    """Per-tower embedding matching between student and teacher (Hinton et al. 2015; "Analyzing
    Student Models in Multi-Modal Knowledge Distillation").

    ``kind`` selects :func:`embedding_mse` (``"mse"``), :func:`cosine_distance` (``"cosine"``) or both
    (``"mse_cosine"``) for one ``tower`` (``"image"`` or ``"text"``: one module per distilled tower). Terms are
    named ``{tower}_{loss}``, e.g. ``image_mse``, ``text_cosine``, each multiplied by ``weight``. Per-row losses:
    computed on the local batch, no gathering. No temperature.
    """

    citation = HINTON_2015 + """
@misc{mmkd_analyzing_student_models,
  title = {Analyzing Student Models in Multi-Modal Knowledge Distillation},
  note  = {Research project whose embedding-distillation objective mmkd implements}
}"""

    def __init__(
        self, kind: EmbeddingDistillationKind = "mse_cosine", tower: str = "image", weight: float = 1.0
    ) -> None:
        super().__init__()
        if kind not in _EMBEDDING_KINDS:
            raise ValueError(f"kind must be one of {_EMBEDDING_KINDS}, got {kind!r}")
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        self.kind: EmbeddingDistillationKind = kind
        self.tower = tower
        self.weight = check_non_negative("weight", weight)

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(f"{self.tower}_{k}" for k in ("mse", "cosine") if k in self.kind.split("_"))

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            return {}
        name = type(self).__name__
        student = require(f"student_{self.tower}", getattr(inputs, f"student_{self.tower}"), name)
        teacher = require(f"teacher_{self.tower}", getattr(inputs, f"teacher_{self.tower}"), name)
        terms: dict[str, Tensor] = {}
        if self.kind in ("mse", "mse_cosine"):
            terms[f"{self.tower}_mse"] = self.weight * embedding_mse(student, teacher)
        if self.kind in ("cosine", "mse_cosine"):
            terms[f"{self.tower}_cosine"] = self.weight * cosine_distance(student, teacher)
        return terms

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tower={self.tower!r}, weight={self.weight}"


class CLIPContrastiveLoss(nn.Module):
    """The student's own CLIP objective (Radford et al. 2021) over the global batch.

    With ``gather=True`` student image and text embeddings are all-gathered *with* gradients before
    :func:`clip_contrastive_loss`, so every rank contrasts against ``world_size * B`` captions, as in
    open_clip with ``gather_with_grad=True``. ``logit_scale`` is the exponentiated multiplier
    (``1 / temperature``, e.g. ``student.logit_scale.exp()``) and is required. ``local_loss=True`` scores only
    this rank's rows against the gathered batch (open_clip's ``--local-loss``: the same gradients, ``world_size``
    times less memory for the logits). ``last_gathered_batch_size`` records the row count of the last computed loss.
    """

    citation = """@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel
               and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela
               and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  pages     = {8748--8763},
  year      = {2021}
}"""

    def __init__(self, weight: float = 1.0, gather: bool = True, local_loss: bool = False) -> None:
        super().__init__()
        self.weight = check_non_negative("weight", weight)
        self.gather = gather
        self.local_loss = local_loss
        self.last_gathered_batch_size: int | None = None

    terms = ("contrastive",)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            self.last_gathered_batch_size = None
            return {}
        student_image = require("student_image", inputs.student_image, "CLIPContrastiveLoss")
        student_text = require("student_text", inputs.student_text, "CLIPContrastiveLoss")
        logit_scale = require(
            "logit_scale (the exponentiated multiplier, e.g. 100.0)", inputs.logit_scale, "CLIPContrastiveLoss"
        )
        rows = local_rows(student_image.shape[0]) if self.gather and self.local_loss else None
        if self.gather:
            student_image = gather_with_grad(student_image)  # (world_size * B, D)
            student_text = gather_with_grad(student_text)  # (world_size * B, D)
        self.last_gathered_batch_size = student_image.shape[0]
        loss = clip_contrastive_loss(student_image, student_text, logit_scale, rows)
        return {"contrastive": self.weight * loss}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, gather={self.gather}, local_loss={self.local_loss}"


class AffinityDistillationLoss(nn.Module):
    """CLIP-KD's contrastive relational distillation (Yang et al., CVPR 2024) over the global batch.

    With ``gather=True`` student embeddings are gathered with gradients and teacher embeddings
    without, so the affinity rows span ``world_size * B`` candidates. ``temperature`` divides cosine
    similarities (0.01 equals CLIP's logit scale of 100); see :func:`affinity_distillation_loss`. ``local_loss``:
    as in :class:`CLIPContrastiveLoss`. ``last_gathered_batch_size`` records the row count of the last computed loss.
    """

    citation = """@inproceedings{yang2024clipkd,
  title     = {CLIP-KD: An Empirical Study of CLIP Model Distillation},
  author    = {Yang, Chuanguang and An, Zhulin and Huang, Libo and Bi, Junyu and Yu, Xinqiang
               and Yang, Han and Diao, Boyu and Xu, Yongjun},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""

    def __init__(
        self, temperature: float = 0.05, weight: float = 1.0, gather: bool = True, local_loss: bool = False
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.weight = check_non_negative("weight", weight)
        self.gather = gather
        self.local_loss = local_loss
        self.last_gathered_batch_size: int | None = None

    terms = ("affinity",)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if self.weight == 0:
            self.last_gathered_batch_size = None
            return {}
        name = "AffinityDistillationLoss"
        student_image = require("student_image", inputs.student_image, name)
        student_text = require("student_text", inputs.student_text, name)
        teacher_image = require("teacher_image", inputs.teacher_image, name)
        teacher_text = require("teacher_text", inputs.teacher_text, name)
        rows = local_rows(student_image.shape[0]) if self.gather and self.local_loss else None
        if self.gather:
            student_image = gather_with_grad(student_image)  # (world_size * B, Ds)
            student_text = gather_with_grad(student_text)  # (world_size * B, Ds)
            # The teacher is a fixed target: gathering it without autograd skips a backward collective.
            teacher_image = gather_no_grad(teacher_image)  # (world_size * B, Dt)
            teacher_text = gather_no_grad(teacher_text)  # (world_size * B, Dt)
        self.last_gathered_batch_size = student_image.shape[0]
        loss = affinity_distillation_loss(
            student_image, student_text, teacher_image, teacher_text, self.temperature, rows
        )
        return {"affinity": self.weight * loss}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weight={self.weight}, gather={self.gather}, "
                f"local_loss={self.local_loss}")


