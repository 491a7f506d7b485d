"""The feature terms' plumbing: which hidden states are paired, the projectors that map a student's width to its
teacher's, and the trainer methods that turn both models' hidden states into the terms' inputs.

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
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from mmkd.losses.features import attention_probs
from mmkd.teachers.base import clip_attention_weights, pooled_index

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


class FoldTeacherHead(TrainerCallback):
    """SimKD: keep the student's own projections equal to projector x teacher projection after every optimizer
    step, so an evaluation callback or a checkpoint loaded as a ``CLIPModel`` sees the trained student."""

    def __init__(self, trainer: FeatureTermsMixin):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.fold_teacher_head()


class FeatureTermsMixin:
    """Mixed into :class:`~mmkd.trainers.clip_distillation.CLIPDistillationTrainer`: the layer pairs, the
    attention maps and hints of a batch, and SimKD's inherited head and fold. Reads ``self.hint_pairs``,
    ``self.attention_pairs``, ``self.teacher``, ``self.model``, ``self.accelerator`` and ``self.args``."""

    @staticmethod
    @torch.no_grad()
    def _inherit_head(head: torch.nn.Linear, model, tower: str) -> None:
        """Start SimKD's projector where weight inheritance started the student: a student initialised from the
        teacher has the teacher's projection restricted to its kept hidden channels, so the projector that makes
        ``teacher projection @ P`` equal to it selects those channels (the identity at equal width). A student
        from scratch keeps the random projector."""
        init = getattr(model.config, "distillation_init", None) or {}
        if init.get("strategy") == "random" or not init.get(f"{TOWERS[tower]}_layers"):
            return
        plan = (init.get("width_plan") or {}).get(TOWERS[tower])
        kept = plan["hidden"] if plan else list(range(head.in_features))
        head.weight.zero_()
        head.weight[torch.tensor(kept), torch.arange(head.in_features)] = 1.0

    @staticmethod
    def _plan_pairs(model, teacher, spec: str, option: str = "hint_layers") -> dict[str, list[tuple[int, int]]]:
        """Per tower, the (student layer, teacher layer) pairs of the student layers ``spec`` names
        (:func:`~mmkd.trainers.hints.parse_hint_layers`), each with the teacher layer it was copied from."""
        init = getattr(model.config, "distillation_init", None) or {}
        pairs = {}
        for tower, cfg_name in TOWERS.items():
            n_student = int(getattr(model.config, f"{cfg_name}_config").num_hidden_layers)
            n_teacher = teacher.depths()[cfg_name]
            mapping = hint_layer_map(init, cfg_name, n_student, n_teacher)
            if any(not 0 <= j < n_teacher for j in mapping):
                raise ValueError(f"the student's {cfg_name} layers were copied from teacher layers {mapping}, but this "
                                 f"teacher has {n_teacher}: is it the student's teacher?")
            pairs[tower] = [(k, mapping[k]) for k in parse_hint_layers(spec, n_student, cfg_name, option)]
        return pairs

    def _attentions(self, student: dict[str, Any], teacher: dict[str, Any], inputs: dict) -> dict[str, Any]:
        """The attention fields of :class:`LossInputs`: each mapped layer's self-attention distributions, recomputed
        from its input hidden state and its LayerNorm / q / k weights (the student's with gradients)."""
        if "teacher_input_ids" in inputs:
            raise ValueError("attention_weight > 0: the teacher has its own tokenizer, so its text attention does not "
                             "line up with the student's tokens")
        unwrapped = self.accelerator.unwrap_model(self.model)
        length, out = inputs["input_ids"].shape[1], {}
        for tower, layer_pairs in self.attention_pairs.items():
            causal = tower == "text"  # padded keys sit after the end-of-text token: the causal mask hides them
            s_states, t_states = student[f"_{tower}_hidden"], teacher[f"_{tower}_hidden"]
            out[f"student_{tower}_attentions"] = [
                attention_probs(s_states[k], *clip_attention_weights(unwrapped, tower, k), causal=causal)
                for k, _ in layer_pairs]
            with torch.no_grad():
                out[f"teacher_{tower}_attentions"] = [
                    attention_probs(t_states[j][:, :length] if causal else t_states[j],
                                    *self.teacher.attention_weights(tower, j), causal=causal)
                    for _, j in layer_pairs]
        return out

    def _hints(self, student: dict[str, Any], teacher: dict[str, Any], inputs: dict) -> dict[str, Any]:
        """The hint fields of :class:`LossInputs`: mapped hidden states, the student's projected."""
        projectors = getattr(self.accelerator.unwrap_model(self.model), PROJECTORS)
        tokens, out = self.args.hint_tokens, {}
        own_ids = "teacher_input_ids" in inputs
        if tokens == "all" and own_ids:
            raise ValueError("hint_tokens=all: the teacher has its own tokenizer, so its text tokens do not line up "
                             "with the student's; use hint_tokens=pooled")
        ids = inputs["input_ids"]
        s_index = t_index = None
        if tokens == "pooled":
            eos = self.accelerator.unwrap_model(self.model).config.text_config.eos_token_id
            s_index = pooled_index(ids, eos)
            t_index = pooled_index(inputs["teacher_input_ids"], self.teacher.eos_token_id) if own_ids else s_index
        for tower, layer_pairs in self.hint_pairs.items():
            s_states, t_states = student.pop(f"_{tower}_hidden"), teacher.pop(f"_{tower}_hidden")
            text = tower == "text"
            length = ids.shape[1] if text and tokens == "all" else None
            out[f"student_{tower}_hints"] = [
                projectors[f"{tower}_{k}"](select_tokens(s_states[k + 1], tokens, s_index if text else None))
                for k, _ in layer_pairs
            ]
            out[f"teacher_{tower}_hints"] = [
                select_tokens(t_states[j + 1], tokens, t_index if text else None, length).to(s_states[0].dtype)
                for _, j in layer_pairs
            ]
        if tokens == "all":
            mask = inputs.get("attention_mask")
            out["text_hint_mask"] = mask if mask is not None else torch.ones_like(ids)
        return out

    @torch.no_grad()
    def fold_teacher_head(self) -> None:
        """SimKD's projector and the teacher's projection are two bias-free linear maps: write their product into
        the student's own ``visual_projection`` / ``text_projection``, so the stock ``CLIPModel`` computes what the
        trained student did."""
        student = self.accelerator.unwrap_model(self.model)
        heads = getattr(student, PROJECTORS)
        for tower, layer in (("image", student.visual_projection), ("text", student.text_projection)):
            folded = self.teacher.projection(tower).float() @ heads[f"{tower}_head"].weight.float()
            layer.weight.copy_(folded.to(layer.weight.dtype))

