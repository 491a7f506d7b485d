"""Shape and dtype handling shared by every loss function in :mod:`mmkd.losses`."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 unless it already is float32/float64: at a logit scale of 100 or a temperature of 0.01
    logits span hundreds of units, where bf16's 8-bit mantissa would visibly distort a loss."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_matrix(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (batch, dim) tensor, got shape {tuple(x.shape)}")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    check_matrix(name_a, a)
    check_matrix(name_b, b)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def as_logits(name: str, x: Tensor) -> Tensor:
    """``(B,)`` or ``(B, 1)`` -> ``(B,)``: a matcher's head may keep its output dimension of 1."""
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]  # (B,)
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) (one logit per pair), got {tuple(x.shape)}")
    return x


def same_pairs(name_a: str, a: Tensor, name_b: str, b: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten both to ``(B,)`` and check they cover the same pairs."""
    flat_a, flat_b = as_logits(name_a, a), as_logits(name_b, b)
    if flat_a.shape != flat_b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return flat_a, flat_b


def require(name: str, x: Tensor | None, module: str) -> Tensor:
    """``x``, or a ``ValueError`` saying that ``module`` needs the input ``name``."""
    if x is None:
        raise ValueError(f"{module} requires {name}, got None")
    return x
