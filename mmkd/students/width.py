"""Narrow students: weight inheritance for width (TinyCLIP's manual inheritance, with a choice of importance).

TinyCLIP (Wu et al., ICCV 2023, "manual weight inheritance") builds a smaller CLIP by keeping some of the teacher's
layers and, inside each kept layer, the front part of every weight: the first ``d`` hidden channels, the first ``h``
attention heads (of unchanged size, 64) and the first ``m`` MLP neurons, every tensor sliced so that what is kept
still computes together. mmkd does the same slicing in a stock ``transformers.CLIPModel``, but keeps the *most
important* channels, heads and neurons instead of the first ones (``first`` is TinyCLIP's choice, kept for the
ablation):

* **Hidden channels** (the residual stream, one set per tower, used by every tensor that reads or writes it: patch /
  token and position embeddings, the class embedding, every LayerNorm, the q / k / v input columns, the
  out-projection and fc2 output rows, fc1 input columns, the projection's input columns).
* **Heads** (per layer) and, when the student's head size is smaller than the teacher's, the **dimensions inside
  each kept head**, chosen separately for q·k (the same dims of q and k, which are multiplied together) and for
  v → out-projection. The queries are scaled by ``sqrt(student head size / teacher head size)`` so that the kept
  dims' dot product keeps the teacher's scale (CLIP divides it by ``sqrt(head size)``).
* **MLP neurons** (per layer): fc1 rows and the matching fc2 columns.

The projection dimension stays the teacher's, so the embedding losses compare like with like.

Importance (``importance=``):

==============  ===============================================================================================
``magnitude``   weight magnitude (default): a channel's sum of squared weights over every tensor that touches it
                in the kept layers; a head's over its q / k / v rows and out-projection columns; a neuron's, or a
                dim inside a head, the product of the L2 norms of the row that writes it and the column that reads it
``activation``  the same products with the mean absolute activation on a calibration batch in place of the
                writing row's norm (padding tokens excluded): what the teacher actually uses on your data
``first``       the first ``k`` (TinyCLIP's manual inheritance, ``weight_inherit.py``)
==============  ===============================================================================================

Where it is exact: keeping every channel reproduces the depth-only student tensor for tensor; dropping MLP neurons,
heads or head dims whose outgoing weights are zero leaves a layer's output unchanged. Dropping hidden channels is
an approximation (every LayerNorm then normalises over fewer channels), which distillation then trains away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmkd.checks import ConfigError

IMPORTANCE = ("magnitude", "activation", "first")
TOWERS = ("vision", "text")


@dataclass(frozen=True)
class TowerShape:
    """One tower's transformer shape: layers, hidden width, attention heads, MLP width."""

    layers: int
    width: int
    heads: int
    mlp: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def of(cls, cfg) -> TowerShape:
        """The shape of a ``CLIPVisionConfig`` / ``CLIPTextConfig`` (or a dict of one)."""
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
        return cls(int(get("num_hidden_layers")), int(get("hidden_size")), int(get("num_attention_heads")),
                   int(get("intermediate_size")))


def resolve_width(
    teacher: TowerShape, tower: str, width: int | None = None, heads: int | None = None, mlp: int | None = None
) -> tuple[int, int, int]:
    """The student tower's ``(width, heads, mlp)``: the teacher's where not given, checked against the teacher.

    Default heads: the teacher's head size kept (``width / teacher head size`` heads, as TinyCLIP does) when
    ``width`` is a multiple of it, else the teacher's head count when it divides ``width``. Default MLP width:
    ``width`` times the teacher's MLP ratio. Raises :class:`~mmkd.checks.ConfigError` naming the option.
    """
    opt = f"student_{tower}_"
    for name, value in (("width", width), ("heads", heads), ("mlp_width", mlp)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{opt}{name}={value!r}: must be an integer >= 1")
    if width is not None and width > teacher.width:
        raise ConfigError(f"{opt}width={width}: wider than the teacher's {tower} width {teacher.width}")
    w = teacher.width if width is None else width
    if heads is None:
        if w % teacher.head_dim == 0:
            heads = w // teacher.head_dim
        elif w % teacher.heads == 0:
            heads = teacher.heads
        else:
            raise ConfigError(f"{opt}width={w}: neither a multiple of the teacher's head size {teacher.head_dim} nor "
                              f"divisible by its {teacher.heads} heads; give {opt}heads")
    if heads > teacher.heads:
        raise ConfigError(f"{opt}heads={heads}: more than the teacher's {teacher.heads} {tower} heads")
    if w % heads:
        raise ConfigError(f"{opt}heads={heads}: {opt}width={w} is not divisible by it")
    if w // heads > teacher.head_dim:
        raise ConfigError(f"{opt}heads={heads}: heads of {w // heads} dims are larger than the teacher's "
                          f"{teacher.head_dim}; use at least {-(-w // teacher.head_dim)} heads")
    if mlp is None:
        mlp = max(1, round(w * teacher.mlp / teacher.width))
    if mlp > teacher.mlp:
        raise ConfigError(f"{opt}mlp_width={mlp}: wider than the teacher's {tower} MLP width {teacher.mlp}")
    return w, heads, mlp


@dataclass
class WidthPlan:
    """What a narrowed tower keeps, in teacher indices (ascending): recorded in the student's ``config.json``."""

    importance: str
    hidden: list[int]
    heads: list[list[int]]  # per student layer: the teacher heads kept
    qk_dims: list[list[list[int]]]  # per student layer, per kept head: dims kept of q and k
    vo_dims: list[list[list[int]]]  # per student layer, per kept head: dims kept of v (out-projection columns)
    mlp: list[list[int]]  # per student layer: the MLP neurons kept
    teacher_head_dim: int

    def rows(self, layer: int, dims: list[list[int]]) -> torch.Tensor:
        """The q/k (or v) output rows of ``layer``: kept heads in order, each its kept dims."""
        hd = self.teacher_head_dim
        return torch.tensor([h * hd + d for h, ds in zip(self.heads[layer], dims[layer], strict=True) for d in ds])

    def record(self) -> dict:
        return asdict(self)


def _top(scores: torch.Tensor, k: int, importance: str) -> list[int]:
    """The ``k`` indices with the highest scores (ties to the lower index), ascending; the first ``k`` for
    ``first``."""
    if importance == "first":
        return list(range(k))
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def _tower_modules(model: nn.Module, tower: str):
    """(transformer, projection, embedding weights reading the hidden channels) of a CLIPModel tower."""
    if tower == "vision":
        tm = model.vision_model
        emb = tm.embeddings
        return tm, model.visual_projection, [emb.patch_embedding.weight.flatten(1).T, emb.class_embedding[None],
                                             emb.position_embedding.weight], [tm.pre_layrnorm, tm.post_layernorm]
    tm = model.text_model
    emb = tm.embeddings
    return tm, model.text_projection, [emb.token_embedding.weight, emb.position_embedding.weight], [tm.final_layer_norm]


def _norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return weight.detach().float().norm(dim=dim)


@torch.no_grad()
def _activations(model: nn.Module, tower: str, layers: Sequence[int], calibration: Mapping) -> dict:
    """Mean absolute activations of a calibration batch in the kept ``layers``: the residual stream (inputs and
    outputs of the kept layers), q and k, the per-head attention outputs (out-projection input) and the MLP
    activations (fc2 input); padding tokens (``attention_mask`` 0) are excluded."""
    tm = _tower_modules(model, tower)[0]
    if tower == "vision":
        inputs = {"pixel_values": calibration["pixel_values"]}
        mask = None
    else:
        inputs = {"input_ids": calibration["input_ids"], "attention_mask": calibration.get("attention_mask")}
        mask = inputs["attention_mask"]
    found: dict = {}

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().abs()
        if mask is not None and x.shape[:2] == mask.shape:
            w = mask.to(x.dtype)[..., None]
            return (x * w).sum((0, 1)) / w.sum().clamp_min(1)
        return x.flatten(0, -2).mean(0)

    def keep(key):
        def hook(module, args, output=None):
            found[key] = mean_abs(args[0] if output is None else output)
        return hook

    handles = []
    for i in layers:
        layer = tm.encoder.layers[i]
        handles += [layer.self_attn.q_proj.register_forward_hook(keep(("q", i))),
                    layer.self_attn.k_proj.register_forward_hook(keep(("k", i))),
                    layer.self_attn.out_proj.register_forward_pre_hook(keep(("o", i))),
                    layer.mlp.fc2.register_forward_pre_hook(keep(("a", i)))]
    try:
        out = tm(**{k: v for k, v in inputs.items() if v is not None}, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    found["hidden"] = sum(mean_abs(out.hidden_states[j]) for j in sorted({*layers, *(i + 1 for i in layers)}))
    return found


def plan_width(
    model: nn.Module, tower: str, layers: Sequence[int], width: int, heads: int, mlp: int,
    importance: str = "magnitude", calibration: Mapping | None = None,
) -> WidthPlan:  # fmt: skip
    """Choose the hidden channels, heads, head dims and MLP neurons a ``(width, heads, mlp)`` student keeps of the
    teacher ``model`` (a ``CLIPModel``), for the teacher ``layers`` the depth strategy kept."""
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if importance == "activation" and calibration is None:
        raise ValueError("importance='activation' needs a calibration batch (pixel_values, input_ids, attention_mask)")
    tm, projection, embeddings, norms = _tower_modules(model, tower)
    t = TowerShape.of(tm.config)
    hd, new_hd = t.head_dim, width // heads
    act = _activations(model, tower, layers, calibration) if importance == "activation" else None

    def sq(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().float() ** 2

    # a hidden channel's magnitude: every squared weight that reads or writes it (used without activations only)
    hidden = act["hidden"] if act is not None else (
        sum(_norms(e, 0) ** 2 for e in embeddings) + sum(sq(n.weight) for n in norms) + _norms(projection.weight, 0) ** 2)
    plan_heads, plan_qk, plan_vo, plan_mlp = [], [], [], []
    for i in layers:
        layer = tm.encoder.layers[i]
        att, fc1, fc2 = layer.self_attn, layer.mlp.fc1, layer.mlp.fc2
        rows = {name: _norms(lin.weight, 1) for name, lin in (("q", att.q_proj), ("k", att.k_proj),
                                                              ("v", att.v_proj), ("fc1", fc1))}
        out_cols, fc2_cols = _norms(att.out_proj.weight, 0), _norms(fc2.weight, 0)
        # products: what writes a unit (its row, or its mean activation) times what reads it (its column)
        if act is None:
            for lin in (att.q_proj, att.k_proj, att.v_proj, fc1):
                hidden = hidden + _norms(lin.weight, 0) ** 2
            hidden = (hidden + _norms(att.out_proj.weight, 1) ** 2 + _norms(fc2.weight, 1) ** 2
                      + sq(layer.layer_norm1.weight) + sq(layer.layer_norm2.weight))
            qk, vo, neuron = rows["q"] * rows["k"], rows["v"] * out_cols, rows["fc1"] * fc2_cols
            head_score = rows["q"] ** 2 + rows["k"] ** 2 + rows["v"] ** 2 + out_cols ** 2
        else:
            qk, vo, neuron = act["q", i] * act["k", i], act["o", i] * out_cols, act["a", i] * fc2_cols
            head_score = qk + vo
        kept = _top(head_score.view(t.heads, hd).sum(1), heads, importance)
        plan_heads.append(kept)
        plan_qk.append([_top(qk.view(t.heads, hd)[h], new_hd, importance) for h in kept])
        plan_vo.append([_top(vo.view(t.heads, hd)[h], new_hd, importance) for h in kept])
        plan_mlp.append(_top(neuron, mlp, importance))
    return WidthPlan(importance=importance, hidden=_top(hidden, width, importance), heads=plan_heads,
                     qk_dims=plan_qk, vo_dims=plan_vo, mlp=plan_mlp, teacher_head_dim=hd)


_TOWER_PARAMS = {  # parameter name inside a tower (outside the layers) -> which of its dims are hidden channels
    "embeddings.class_embedding": 0,
    "embeddings.patch_embedding.weight": 0,
    "embeddings.position_embedding.weight": 1,
    "embeddings.token_embedding.weight": 1,
    "pre_layrnorm.weight": 0, "pre_layrnorm.bias": 0,
    "post_layernorm.weight": 0, "post_layernorm.bias": 0,
    "final_layer_norm.weight": 0, "final_layer_norm.bias": 0,
}  # fmt: skip


def slice_tower_param(name: str, tensor: torch.Tensor, plan: WidthPlan, layer: int | None,
                      student_head_dim: int) -> torch.Tensor:  # fmt: skip
    """The student's copy of one teacher tensor of a narrowed tower. ``name`` is relative to the tower
    (``embeddings.position_embedding.weight``) or, with ``layer`` (the student layer), to the layer
    (``self_attn.q_proj.weight``); ``projection.weight`` is the tower's projection. Unknown names raise."""
    h = torch.tensor(plan.hidden)
    if layer is None:
        if name == "projection.weight":
            return tensor[:, h]
        if name == "embeddings.position_ids":
            return tensor
        if name not in _TOWER_PARAMS:
            raise KeyError(f"no width-slicing rule for tower parameter {name!r}")
        return tensor.index_select(_TOWER_PARAMS[name], h)
    module, kind = name.rsplit(".", 1)
    if module in ("layer_norm1", "layer_norm2"):
        return tensor[h]
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        rows = plan.rows(layer, plan.vo_dims if module == "self_attn.v_proj" else plan.qk_dims)
        out = tensor[rows][:, h] if kind == "weight" else tensor[rows]
        if module == "self_attn.q_proj":  # keep the teacher's 1/sqrt(head size) on the kept dims' dot product
            out = out * (student_head_dim / plan.teacher_head_dim) ** 0.5
        return out
    if module == "self_attn.out_proj":
        return tensor[h][:, plan.rows(layer, plan.vo_dims)] if kind == "weight" else tensor[h]
    neurons = torch.tensor(plan.mlp[layer])
    if module == "mlp.fc1":
        return tensor[neurons][:, h] if kind == "weight" else tensor[neurons]
    if module == "mlp.fc2":
        return tensor[h][:, neurons] if kind == "weight" else tensor[h]
    raise KeyError(f"no width-slicing rule for layer parameter {name!r}")
