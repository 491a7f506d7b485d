"""Feature-level distillation: hidden-state hints (FitNets, Romero et al., 2015), self-attention transfer (MiniLM,
Wang et al., 2020) and SimKD's feature alignment (Chen et al., 2022).

The trainer hands the loss, per tower, a list of ``(student hint, teacher hint)`` pairs: the student's hidden state
at a mapped layer, already mapped to the teacher's width by its projector, and the teacher's hidden state at the
layer it is paired with (:mod:`mmkd.trainers.hints`). Each pair is compared with

* ``mse``: ``mean((s - t)^2)`` over every kept token (padding excluded) and channel -- FitNets' l2 hint loss up
  to its constant;
* ``cosine``: the mean over kept tokens of ``1 - cos(s, t)``.

The tower's term is ``weight x sum_k w_k * d_k / sum_k w_k`` with ``w_k`` the layer weights (equal by default).
"""

from __future__ import annotations

import abc

import torch
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


def parse_layer_weights(spec: str | None, n: int) -> list[float] | None:
    """``"0.5,1"`` -> ``[0.5, 1.0]`` (one per hinted layer, >= 0, not all 0); ``None`` -> equal weights."""
    if spec is None or str(spec).strip() == "":
        return None
    try:
        weights = [float(x) for x in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"hint_layer_weights={spec!r}: comma-separated numbers") from None
    if len(weights) != n:
        raise ValueError(f"hint_layer_weights={spec!r}: {len(weights)} weights for {n} hinted layers")
    if any(not 0 <= w < float("inf") for w in weights) or not sum(weights) > 0:
        raise ValueError(f"hint_layer_weights={spec!r}: weights must be finite, >= 0 and not all 0")
    return weights


class _PerTowerTerm(nn.Module, abc.ABC):
    """``weight x`` one value per tower (:meth:`value`), returned as the terms ``image_<name>`` and ``text_<name>``."""

    name: str = ""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    @property
    def terms(self) -> tuple[str, str]:
        return (f"image_{self.name}", f"text_{self.name}")

    @abc.abstractmethod
    def value(self, inputs: LossInputs, tower: str) -> Tensor:
        """The tower's unweighted term."""

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        return {f"{tower}_{self.name}": self.weight * self.value(inputs, tower) for tower in ("image", "text")}


class HintLoss(_PerTowerTerm):
    """FitNets hints for both towers: terms ``image_hint`` and ``text_hint`` (see the module docstring)."""

    citation = FITNETS
    name = "hint"

    def __init__(self, weight: float = 1.0, kind: str = "mse", layer_weights: str | None = None):
        super().__init__(weight)
        if kind not in HINT_KINDS:
            raise ValueError(f"unknown hint loss {kind!r}; choose one of {', '.join(HINT_KINDS)}")
        self.kind = kind
        self.layer_weights = layer_weights  # "0.5,1": one per hinted layer of each tower (None: equal)

    def value(self, inputs: LossInputs, tower: str) -> Tensor:
        students, teachers = getattr(inputs, f"student_{tower}_hints"), getattr(inputs, f"teacher_{tower}_hints")
        if students is None or teachers is None:
            raise ValueError(f"the hint term needs student_{tower}_hints and teacher_{tower}_hints")
        if len(students) != len(teachers) or not students:
            raise ValueError(f"{len(students)} student vs {len(teachers)} teacher {tower} hints")
        weights = parse_layer_weights(self.layer_weights, len(students)) or [1.0] * len(students)
        mask = inputs.text_hint_mask if tower == "text" else None
        total = sum(w * hint_distance(s, t, self.kind, mask) for w, s, t in zip(weights, students, teachers,
                                                                                strict=True))
        return total / sum(weights)


SIMKD = """@inproceedings{chen2022simkd,
  title     = {Knowledge Distillation with the Reused Teacher Classifier},
  author    = {Chen, Defang and Mei, Jian-Ping and Zhang, Hailin and Wang, Can and Feng, Yan and Chen, Chun},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  year      = {2022}
}"""


class SimKDLoss(_PerTowerTerm):
    """SimKD: the student's pooled feature, through its projector, against the teacher's pre-projection pooled
    feature, ``weight x mean((P f_s - f_t)^2)`` per tower (terms ``image_simkd``, ``text_simkd``); the student's
    embedding is then the teacher's projection of ``P f_s`` (the trainer reuses the teacher's head)."""

    citation = SIMKD
    name = "simkd"

    def value(self, inputs: LossInputs, tower: str) -> Tensor:
        s, t = getattr(inputs, f"student_{tower}_feature"), getattr(inputs, f"teacher_{tower}_feature")
        if s is None or t is None:
            raise ValueError(f"the SimKD term needs student_{tower}_feature and teacher_{tower}_feature")
        if s.shape != t.shape:
            raise ValueError(f"SimKD feature shapes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
        return ((s.float() - t.detach().float()) ** 2).mean()


MINILM = """@inproceedings{wang2020minilm,
  title     = {MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers},
  author    = {Wang, Wenhui and Wei, Furu and Dong, Li and Bao, Hangbo and Yang, Nan and Zhou, Ming},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2020}
}"""


def attention_probs(x: Tensor, ln: nn.Module, wq: Tensor, bq: Tensor | None, wk: Tensor, bk: Tensor | None,
                    heads: int, causal: bool = False, key_mask: Tensor | None = None) -> Tensor:  # fmt: skip
    """A layer's self-attention distributions ``(B, heads, N, N)`` from its input ``x`` ``(B, N, D)``: LayerNorm,
    the q and k projections, ``softmax(q k^T / sqrt(head size))`` with the causal mask and padded keys
    (``key_mask`` ``(B, N)``, 1 = real) excluded -- what the layer computes, for transformers and open_clip alike."""
    h = ln(x)
    b, n, _ = h.shape
    q = F.linear(h, wq, bq).view(b, n, heads, -1).transpose(1, 2)
    k = F.linear(h, wk, bk).view(b, n, heads, -1).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return scores.float().softmax(-1)


def attention_kl(teacher: Tensor, student: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """``KL(teacher || student)`` of attention rows ``(B, H, N, N)``, averaged over heads and the query rows
    ``row_mask`` ``(B, N)`` keeps; with different head counts both sides are first averaged over their heads."""
    if teacher.shape[1] != student.shape[1]:
        teacher, student = teacher.mean(1, keepdim=True), student.mean(1, keepdim=True)
    if teacher.shape != student.shape:
        raise ValueError(f"attention shapes differ: teacher {tuple(teacher.shape)} vs student {tuple(student.shape)}")
    t = teacher.detach().float()
    kl = (t * (t.clamp_min(1e-12).log() - student.float().clamp_min(1e-12).log())).sum(-1)  # (B, H, N)
    if row_mask is None:
        return kl.mean()
    w = row_mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * w).sum() / w.sum().clamp_min(1)


class AttentionTransferLoss(_PerTowerTerm):
    """MiniLM's self-attention distribution transfer at mapped layers: ``weight x mean_k KL(A_t || A_s)`` per tower
    (terms ``image_attention``, ``text_attention``)."""

    citation = MINILM
    name = "attention"

    def value(self, inputs: LossInputs, tower: str) -> Tensor:
        students = getattr(inputs, f"student_{tower}_attentions")
        teachers = getattr(inputs, f"teacher_{tower}_attentions")
        if not students or teachers is None or len(students) != len(teachers):
            raise ValueError(f"the attention term needs as many student as teacher {tower} attention maps")
        mask = inputs.text_hint_mask if tower == "text" else None
        return sum(attention_kl(t, s, mask) for s, t in zip(students, teachers, strict=True)) / len(students)
