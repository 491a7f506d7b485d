"""Feature-level distillation: hidden-state hints (FitNets, Romero et al., 2015) and SimKD's feature alignment
(Chen et al., 2022).

The trainer hands the loss, per tower, a list of ``(student hint, teacher hint)`` pairs: the student's hidden state
at a mapped layer, already mapped to the teacher's width by its projector, and the teacher's hidden state at the
layer it is paired with (:mod:`mmkd.trainers.hints`). Each pair is compared with

* ``mse``: ``mean((s - t)^2)`` over every kept token (padding excluded) and channel -- FitNets' l2 hint loss up
  to its constant;
* ``cosine``: the mean over kept tokens of ``1 - cos(s, t)``.

The tower's term is ``weight x sum_k w_k * d_k / sum_k w_k`` with ``w_k`` the layer weights (equal by default).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.losses import LossInputs

HINT_KINDS = ("mse", "cosine")

FITNETS = """@inproceedings{romero2015fitnets,
  title     = {FitNets: Hints for Thin Deep Nets},
  author    = {Romero, Adriana and Ballas, Nicolas and Kahou, Samira Ebrahimi and Chassang, Antoine and Gatta, Carlo
               and Bengio, Yoshua},
  booktitle = {International Conference on Learning Representations},
  year      = {2015}
}"""


def hint_distance(student: Tensor, teacher: Tensor, kind: str = "mse", mask: Tensor | None = None) -> Tensor:
    """The distance between a student hint and its teacher hint, both ``(B, D)`` or ``(B, N, D)``; ``mask``
    ``(B, N)`` (1 = a real token) excludes padding from the mean."""
    if kind not in HINT_KINDS:
        raise ValueError(f"unknown hint loss {kind!r}; choose one of {', '.join(HINT_KINDS)}")
    if student.shape != teacher.shape:
        raise ValueError(f"hint shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    s, t = student.float(), teacher.detach().float()
    per_token = ((s - t) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if mask is None or per_token.dim() == 1:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1)


class HintLoss(nn.Module):
    """FitNets hints for both towers: terms ``image_hint`` and ``text_hint`` (see the module docstring)."""

    citation = FITNETS
    terms = ("image_hint", "text_hint")

    def __init__(self, weight: float = 1.0, kind: str = "mse", layer_weights: dict[str, list[float]] | None = None):
        super().__init__()
        if kind not in HINT_KINDS:
            raise ValueError(f"unknown hint loss {kind!r}; choose one of {', '.join(HINT_KINDS)}")
        self.weight, self.kind = float(weight), kind
        self.layer_weights = layer_weights or {}

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        out = {}
        for tower in ("image", "text"):
            students, teachers = getattr(inputs, f"student_{tower}_hints"), getattr(inputs, f"teacher_{tower}_hints")
            if students is None or teachers is None:
                raise ValueError(f"the hint term needs student_{tower}_hints and teacher_{tower}_hints")
            if len(students) != len(teachers) or not students:
                raise ValueError(f"{len(students)} student vs {len(teachers)} teacher {tower} hints")
            weights = self.layer_weights.get(tower) or [1.0] * len(students)
            if len(weights) != len(students):
                raise ValueError(f"{len(weights)} {tower} layer weights for {len(students)} hinted layers")
            mask = inputs.text_hint_mask if tower == "text" else None
            total = sum(w * hint_distance(s, t, self.kind, mask) for w, s, t in zip(weights, students, teachers,
                                                                                    strict=True))
            out[f"{tower}_hint"] = self.weight * total / sum(weights)
        return out



SIMKD = """@inproceedings{chen2022simkd,
  title     = {Knowledge Distillation with the Reused Teacher Classifier},
  author    = {Chen, Defang and Mei, Jian-Ping and Zhang, Hailin and Wang, Can and Feng, Yan and Chen, Chun},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  year      = {2022}
}"""


class SimKDLoss(nn.Module):
    """SimKD: the student's pooled feature, through its projector, against the teacher's pre-projection pooled
    feature, ``weight x mean((P f_s - f_t)^2)`` per tower (terms ``image_simkd``, ``text_simkd``); the student's
    embedding is then the teacher's projection of ``P f_s`` (the trainer reuses the teacher's head)."""

    citation = SIMKD
    terms = ("image_simkd", "text_simkd")

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        out = {}
        for tower in ("image", "text"):
            s, t = getattr(inputs, f"student_{tower}_feature"), getattr(inputs, f"teacher_{tower}_feature")
            if s is None or t is None:
                raise ValueError(f"the SimKD term needs student_{tower}_feature and teacher_{tower}_feature")
            if s.shape != t.shape:
                raise ValueError(f"SimKD feature shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
            out[f"{tower}_simkd"] = self.weight * ((s.float() - t.detach().float()) ** 2).mean()
        return out
