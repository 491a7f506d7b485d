"""Pruning without retraining, for the compression report: what it saves and what it costs, measured honestly.

Two techniques, each on a copy of a ``CLIPModel`` (the report prunes the teacher, as research 004 prunes its
baseline models, and puts the result beside distillation and int8):

* **Unstructured magnitude pruning** (``magnitude:0.3,0.5``): ``torch.nn.utils.prune.global_unstructured`` with
  ``L1Unstructured`` over the weights of every ``nn.Linear`` of both towers and both projections (embeddings, norms
  and biases stay dense), made permanent with ``prune.remove``. Exactly ``round(level x n)`` of those ``n`` weights
  become zero. The model stays dense: the same bytes in ``save_pretrained`` and, on dense kernels, the same
  speed; what it could save is shown by :func:`sparse_size` (the weights stored as CSR).
* **Structured pruning** (``structured:0.5``): every tower keeps its depth and head count but loses ``level`` of its
  hidden channels (a multiple of the heads, so every head shrinks alike) and MLP neurons, chosen by weight
  magnitude and sliced with :mod:`mmkd.students.width` (the same weight inheritance as a narrow student, without
  the distillation that follows it). The model is smaller and faster for real.
"""

from __future__ import annotations

import copy
import io
import re
import warnings

import torch
from torch import nn

PRUNING_METHODS = ("magnitude", "structured")
#: what each method does, as the report says it
PRUNING_HOW = {
    "magnitude": "torch.nn.utils.prune.global_unstructured(L1Unstructured) over every nn.Linear weight, made permanent",
    "structured": "every layer and head kept, each tower's hidden channels (per head) and MLP neurons cut to "
    "1 - level by weight magnitude, tensors sliced as for a narrow student (mmkd.students.width)",
}
_SPEC = re.compile(r"^(magnitude|structured):([0-9.,\s]+)$")


def parse_prune_spec(spec: str) -> list[tuple[str, float]]:
    """``"magnitude:0.3,0.5"`` -> ``[("magnitude", 0.3), ("magnitude", 0.5)]``; levels in (0, 1). Raises
    ``ValueError`` naming the spec."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"--prune {spec!r}: expected METHOD:LEVEL[,LEVEL...] with METHOD one of "
                         f"{', '.join(PRUNING_METHODS)}, e.g. magnitude:0.3,0.5")
    levels = []
    for text in m.group(2).split(","):
        try:
            level = float(text)
        except ValueError:
            raise ValueError(f"--prune {spec!r}: {text.strip()!r} is not a number") from None
        if not 0 < level < 1:
            raise ValueError(f"--prune {spec!r}: level {level} must be in (0, 1) (the fraction removed)")
        levels.append((m.group(1), level))
    return levels


def prunable_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` of every ``nn.Linear`` of the model (the towers' layers and the projections)."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def magnitude_prune(model: nn.Module, level: float) -> nn.Module:
    """A copy of ``model`` with the smallest ``level`` fraction of its Linear weights (globally, by absolute
    value) set to zero; ``model`` is left alone."""
    from torch.nn.utils import prune

    clone = copy.deepcopy(model).float().eval()
    params = prunable_linears(clone)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=level)
    for module, name in params:
        prune.remove(module, name)
    return clone


def structured_prune(model: nn.Module, level: float):
    """A smaller ``CLIPModel`` keeping ``1 - level`` of every tower's hidden channels and MLP neurons (all layers,
    all heads), by weight magnitude. Returns ``(model, {"vision": (width, heads, mlp), "text": ...})``."""
    from mmkd.students import build_student

    cfg = model.config
    shapes = {}
    for tower in ("vision", "text"):
        tc = getattr(cfg, f"{tower}_config")
        heads, head_dim = tc.num_attention_heads, tc.hidden_size // tc.num_attention_heads
        shapes[tower] = (heads * max(1, round((1 - level) * head_dim)), heads,
                         max(1, round((1 - level) * tc.intermediate_size)))
    student, _ = build_student(
        model, vision_layers=list(range(cfg.vision_config.num_hidden_layers)),
        text_layers=list(range(cfg.text_config.num_hidden_layers)), allow_full_depth=True,
        vision_width=shapes["vision"][0], vision_heads=shapes["vision"][1], vision_mlp_width=shapes["vision"][2],
        text_width=shapes["text"][0], text_heads=shapes["text"][1], text_mlp_width=shapes["text"][2],
        teacher_name=getattr(cfg, "_name_or_path", None),
    )
    return student.eval(), shapes


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def prunable_sparsity(model: nn.Module) -> float:
    """The fraction of zeros among the Linear weights (what :func:`magnitude_prune`'s ``level`` sets)."""
    weights = [getattr(m, name) for m, name in prunable_linears(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total


def sparse_size(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the state dict with every Linear weight stored as a CSR tensor (values, int32
    column indices and row pointers, each in its own storage) and everything else dense: what the zeros could save on
    disk with a sparse format."""
    linear_weights = {id(getattr(m, name)) for m, name in prunable_linears(model)}
    state = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
        for key, value in model.state_dict(keep_vars=True).items():
            tensor = value.detach()
            if id(value) in linear_weights:
                csr = tensor.to_sparse_csr()
                # to_sparse_csr's column indices are a view into an int64 buffer twice their size; torch.save would
                # write the whole buffer: rebuild from compact int32 copies
                tensor = torch.sparse_csr_tensor(csr.crow_indices().int().clone(), csr.col_indices().int().clone(),
                                                 csr.values().clone(), csr.shape)
            state[key] = tensor
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes
