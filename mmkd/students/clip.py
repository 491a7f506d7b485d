"""CLIP students of any depth and width: a stock ``transformers.CLIPModel`` initialised from its teacher.

Depth: the student keeps some of the teacher's transformer layers in each tower (half by default, odd depths rounded
up), chosen by a named strategy:

==============  =======================  =====================================================================
strategy        12 -> 6 layers           used by
==============  =======================  =====================================================================
``every_other`` [0, 2, 4, 6, 8, 10]      TinyCLIP's "interval_front"; the research project's half-depth student
``distilbert``  [0, 2, 4, 7, 9, 11]      DistilBERT (spread over the whole depth, first and last kept)
``odd``         [1, 3, 5, 7, 9, 11]      DistillCLIP
``first``       [0, 1, 2, 3, 4, 5]       the bottom of the teacher
``random``      -                        no teacher weights at all: the from-scratch baseline
==============  =======================  =====================================================================

Width (optional, per tower): hidden width, attention heads and MLP width; every kept tensor is then sliced to the
most important channels, heads and neurons (:mod:`mmkd.students.width`, TinyCLIP's manual weight inheritance).
Patch size, context length, vocabulary and projection dim stay the teacher's, so the embedding losses apply
unchanged. Embeddings, final norms, projections and the logit scale are copied (sliced when narrower).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from transformers import CLIPConfig, CLIPModel

from mmkd.students.width import (
    IMPORTANCE,
    TowerShape,
    WidthPlan,
    plan_width,
    resolve_width,
    slice_tower_param,
)


def _every_other(n: int, k: int) -> list[int]:
    return [(i * n) // k for i in range(k)]


def _distilbert(n: int, k: int) -> list[int]:
    if k == 1:
        return [0]
    # floor(x + 0.5) rather than round(): Python's round() is banker's rounding.
    return [math.floor(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def _odd(n: int, k: int) -> list[int]:
    # Every other layer counted down from the last, so the last layer is always kept: 12 -> 6 gives 1, 3, ... 11.
    if 2 * k - 1 > n:
        raise ValueError(f"strategy 'odd' keeps at most {math.ceil(n / 2)} of {n} layers, not {k}")
    return [n - 1 - 2 * (k - 1 - i) for i in range(k)]


def _first(n: int, k: int) -> list[int]:
    return list(range(k))


# name -> (teacher depth n, student depth k) -> the teacher layers to copy, or None: copy nothing (random init).
# A new strategy is one entry (in a config subclass's ``layer_strategies``, or a dict passed to build_student).
STRATEGIES: dict[str, Callable[[int, int], list[int] | None]] = {
    "every_other": _every_other,
    "distilbert": _distilbert,
    "odd": _odd,
    "first": _first,
    "random": lambda n, k: None,
}


def student_depth(teacher_depth: int, depth: int | None = None, *, allow_full_depth: bool = False) -> int:
    """The student's depth: ``depth`` if given, else half the teacher's rounded up. Validated."""
    if teacher_depth < 1:
        raise ValueError(f"teacher depth must be >= 1, got {teacher_depth}")
    if depth is None:
        return math.ceil(teacher_depth / 2)
    if depth < 1:
        raise ValueError(f"student depth must be >= 1, got {depth}")
    if depth > teacher_depth or (depth == teacher_depth and not allow_full_depth):
        raise ValueError(
            f"student depth {depth} must be smaller than the teacher's depth {teacher_depth} "
            "(a student as deep as its teacher is no compression)"
        )
    return depth


def select_layers(
    teacher_depth: int, depth: int, strategy: str, strategies: Mapping[str, Callable] = STRATEGIES
) -> list[int] | None:
    """Which teacher layers a ``depth``-layer student copies, for a named ``strategy`` (``None``: none, random init)."""
    if strategy not in strategies:
        raise ValueError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(strategies)}")
    if not 1 <= depth <= teacher_depth:
        raise ValueError(f"student depth {depth} is out of range for a teacher of depth {teacher_depth}")
    layers = strategies[strategy](teacher_depth, depth)
    if layers is not None:
        layers = _check_indices(list(layers), teacher_depth, f"strategy {strategy!r}")
        if len(layers) != depth:
            raise ValueError(f"strategy {strategy!r} picked {len(layers)} layers for a {depth}-layer student")
    return layers


def _check_indices(indices: list[int], teacher_depth: int, tower: str) -> list[int]:
    for i in indices:
        if not 0 <= i < teacher_depth:
            raise ValueError(f"{tower} layer index {i} is out of range for a teacher with {teacher_depth} layers")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{tower} layer indices {indices} repeat a layer")
    return list(indices)


@dataclass
class StudentInit:
    """How a student was initialised; stored in the student's ``config.json`` under ``distillation_init``."""

    strategy: str
    vision_layers: list[int]
    text_layers: list[int]
    teacher_vision_depth: int
    teacher_text_depth: int
    teacher: str | None = None
    # the narrowed towers' (width, heads, MLP width) and the importance that chose what they keep; None: full width
    vision_shape: dict | None = None
    text_shape: dict | None = None
    importance: str | None = None


def build_student(
    teacher_model: CLIPModel,
    *,
    vision_depth: int | None = None,
    text_depth: int | None = None,
    strategy: str = "every_other",
    vision_layers: list[int] | None = None,
    text_layers: list[int] | None = None,
    vision_width: int | None = None,
    text_width: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    vision_mlp_width: int | None = None,
    text_mlp_width: int | None = None,
    importance: str = "magnitude",
    calibration: Mapping[str, torch.Tensor] | None = None,
    teacher_name: str | None = None,
    seed: int = 0,
    allow_full_depth: bool = False,
    strategies: Mapping[str, Callable[[int, int], list[int] | None]] = STRATEGIES,
) -> tuple[CLIPModel, StudentInit]:
    """Build a student ``CLIPModel`` from a transformers ``CLIPModel`` teacher.

    Args:
        teacher_model: the teacher as a transformers ``CLIPModel`` (``CLIPTeacher.to_transformers()`` gives one for
            open_clip teachers, by exact weight conversion).
        vision_depth / text_depth: student depth per tower; default half the teacher's, rounded up.
        strategy: how layers are picked: a name of ``strategies`` (see the module docstring), ``random`` for a
            from-scratch student.
        vision_layers / text_layers: explicit teacher layer indices, overriding depth and strategy for that tower.
        vision_width / text_width, vision_heads / text_heads, vision_mlp_width / text_mlp_width: the tower's
            hidden width, heads and MLP width (default: the teacher's; see
            :func:`mmkd.students.width.resolve_width` for the defaults of heads and MLP width under a narrower
            width). Giving any of a tower's three slices that tower by ``importance``, even to the teacher's shape.
        importance: which channels, heads and neurons a narrower tower keeps: ``magnitude``, ``activation``
            (needs ``calibration``: a batch with ``pixel_values``, ``input_ids``, ``attention_mask``) or ``first``.
        teacher_name: recorded in the student's config.
        seed: seeds the random initialisation of everything not copied.
        allow_full_depth: permit a student as deep as the teacher (a width-only student; the exactness tests).
        strategies: the table of named strategies (default :data:`STRATEGIES`).
    """
    if strategy not in strategies:
        raise ValueError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(strategies)}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    tcfg: CLIPConfig = teacher_model.config
    n_vision = tcfg.vision_config.num_hidden_layers
    n_text = tcfg.text_config.num_hidden_layers

    def plan(explicit, depth, n, tower):
        if explicit is not None:
            idx = _check_indices(explicit, n, tower)
            student_depth(n, len(idx), allow_full_depth=allow_full_depth)
            return idx, len(idx)
        d = student_depth(n, depth, allow_full_depth=allow_full_depth)
        return select_layers(n, d, strategy, strategies), d

    v_idx, v_depth = plan(vision_layers, vision_depth, n_vision, "vision")
    t_idx, t_depth = plan(text_layers, text_depth, n_text, "text")
    if (v_idx is None) != (t_idx is None):
        raise ValueError(f"strategy {strategy!r} copies no teacher layers; do not pass vision_layers / text_layers")
    from_scratch = v_idx is None
    v_idx, t_idx = v_idx or [], t_idx or []

    cfg = copy.deepcopy(tcfg)
    cfg.vision_config.num_hidden_layers = v_depth
    cfg.text_config.num_hidden_layers = t_depth
    cfg.architectures = ["CLIPModel"]
    shapes = {}
    for tower, w, h, m in (("vision", vision_width, vision_heads, vision_mlp_width),
                           ("text", text_width, text_heads, text_mlp_width)):
        if (w, h, m) == (None, None, None):
            continue
        tower_cfg = getattr(cfg, f"{tower}_config")
        width, heads, mlp = resolve_width(TowerShape.of(tower_cfg), tower, w, h, m)
        tower_cfg.hidden_size, tower_cfg.num_attention_heads, tower_cfg.intermediate_size = width, heads, mlp
        shapes[tower] = {"width": width, "heads": heads, "mlp_width": mlp}
    info = StudentInit(
        strategy=strategy,
        vision_layers=v_idx,
        text_layers=t_idx,
        teacher_vision_depth=n_vision,
        teacher_text_depth=n_text,
        teacher=teacher_name,
        vision_shape=shapes.get("vision"),
        text_shape=shapes.get("text"),
        importance=importance if shapes and not from_scratch else None,
    )
    cfg.distillation_init = asdict(info)
    plans: dict[str, WidthPlan] = {}
    if not from_scratch:
        for tower, layers in (("vision", v_idx), ("text", t_idx)):
            if tower in shapes:
                s = shapes[tower]
                plans[tower] = plan_width(teacher_model, tower, layers, s["width"], s["heads"], s["mlp_width"],
                                          importance=importance, calibration=calibration)
        if plans:  # which channels, heads and neurons were kept, in teacher indices
            cfg.distillation_init["width_plan"] = {tower: p.record() for tower, p in plans.items()}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = CLIPModel(cfg)
    student.to(torch.float32)
    if from_scratch:
        return student, info

    teacher_sd = teacher_model.state_dict()
    towers = {"vision": ("vision_model.", "visual_projection.", v_idx), "text": ("text_model.", "text_projection.", t_idx)}
    new_sd = {}
    for key in student.state_dict():
        src, tower, name, layer = key, None, None, None
        for t, (prefix, projection, idx) in towers.items():
            if key.startswith(prefix + "encoder.layers."):
                layer_text, name = key[len(prefix + "encoder.layers.") :].split(".", 1)
                layer = int(layer_text)
                src, tower = f"{prefix}encoder.layers.{idx[layer]}.{name}", t
            elif key.startswith(prefix):
                tower, name = t, key[len(prefix) :]
            elif key.startswith(projection):
                tower, name = t, "projection." + key[len(projection) :]
        if src not in teacher_sd:
            raise KeyError(f"teacher state dict has no {src!r} for student parameter {key!r}")
        tensor = teacher_sd[src].detach().to(torch.float32)
        if tower in plans:
            tensor = slice_tower_param(name, tensor, plans[tower], layer, shapes[tower]["width"] // shapes[tower]["heads"])
        new_sd[key] = tensor.clone()
    student.load_state_dict(new_sd, strict=True)
    return student, info


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of a ``CLIPModel``: total and per tower (embeddings and projections included)."""
    vision = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    text = sum(p.numel() for p in model.text_model.parameters()) + model.text_projection.weight.numel()
    return {"total": sum(p.numel() for p in model.parameters()), "vision": vision, "text": text}
