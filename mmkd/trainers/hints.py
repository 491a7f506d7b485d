"""Which hidden states are hinted, and the projectors that map a student's width to its teacher's.

* **Layer map** (:func:`hint_layer_map`): student layer ``k`` is paired with the teacher layer it was copied from
  (``distillation_init``'s ``vision_layers`` / ``text_layers``); a student with no copied layers (random init) is
  paired proportionally, its last layer with the teacher's last. ``hint_layers`` picks the hinted student layers:
  ``last``, ``all`` or indices (``0,2``). Hidden state ``k + 1`` is the output of layer ``k``.
* **Tokens**: ``all`` (text padding excluded) or ``pooled`` (the class token of the vision tower, the end-of-text
  token of the text tower: where each model pools).
* **Projectors** (:class:`HintProjectors`): one per hinted pair and tower, student width -> teacher width, ``linear``
  (no bias; an identity when the widths are equal) or ``mlp`` (linear, GELU, linear). They are training-only: the
  trainer attaches them to the student under :data:`PROJECTORS` so the optimizer, DDP and checkpoints see them
  (a resume is exact), and removes them when it saves the final student, which stays a stock ``CLIPModel``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

PROJECTORS = "mmkd_projectors"
PROJECTOR_KINDS = ("linear", "mlp")
HINT_TOKENS = ("all", "pooled")
TOWERS = {"image": "vision", "text": "text"}


def hint_layer_map(init: Mapping | None, tower: str, n_student: int, n_teacher: int) -> list[int]:
    """The teacher layer paired with each student layer of ``tower`` (``vision`` or ``text``)."""
    copied = (init or {}).get(f"{tower}_layers")
    if copied:
        if len(copied) != n_student:
            raise ValueError(f"distillation_init lists {len(copied)} {tower} layers for a {n_student}-layer student")
        return list(copied)
    return [((k + 1) * n_teacher) // n_student - 1 for k in range(n_student)]


def parse_hint_layers(spec: str, n_student: int, tower: str = "", option: str = "hint_layers") -> list[int]:
    """``last`` -> ``[n - 1]``; ``all`` -> every layer; ``"0,2"`` -> those student layers (checked)."""
    spec = str(spec).strip()
    if spec == "last":
        return [n_student - 1]
    if spec == "all":
        return list(range(n_student))
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"{option}={spec!r}: last, all or comma-separated student layer indices") from None
    bad = [k for k in layers if not 0 <= k < n_student]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"{option}={spec!r}: the {tower} student has layers 0..{n_student - 1}, each at most once")
    return layers  # in the order given: hint_layer_weights follow it


def _projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"projector={kind!r}: choose one of {', '.join(PROJECTOR_KINDS)}")


class HintProjectors(nn.ModuleDict):
    """``"<tower>_<student layer>"`` -> projector (see the module docstring)."""

    def __init__(self, pairs: Mapping[str, list[tuple[int, int]]], widths: Mapping[str, tuple[int, int]],
                 kind: str = "linear", seed: int = 0):  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().__init__({f"{tower}_{k}": _projector(kind, *widths[tower]) for tower, layer_pairs in pairs.items()
                              for k, _ in layer_pairs})


def select_tokens(state: Tensor, tokens: str, index: Tensor | None = None, length: int | None = None) -> Tensor:
    """``(B, N, D)`` -> the hinted tokens: ``pooled`` the token at ``index`` (``None``: the first, the class
    token), ``all`` the first ``length`` tokens (every one when ``None``)."""
    if tokens == "pooled":
        if index is None:
            return state[:, 0]
        return state[torch.arange(state.shape[0], device=state.device), index.to(state.device)]
    return state if length is None else state[:, :length]
