"""Frozen teachers: the freezing every teacher shares, and the CLIP teacher interface of both backends.

A CLIP teacher gives projected image and text embeddings (raw and normalised), per-layer hidden states when asked,
its logit scale, and its own image preprocessing and tokenizer. Every teacher is frozen for good (see
:class:`FrozenTeacher`) and is a plain ``nn.Module``, so ``accelerator.prepare_model(teacher, evaluation_mode=True)``
moves and casts it. The backends are :mod:`mmkd.teachers.openclip` and :mod:`mmkd.teachers.transformers_clip`;
:func:`mmkd.teachers.load_teacher` picks one.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

    from mmkd.data.preprocessing import Preprocessing


def clip_attention_weights(model, tower: str, layer: int) -> tuple:
    """``(layer norm, Wq, bq, Wk, bk, heads)`` of layer ``layer`` of a transformers ``CLIPModel`` tower (the student,
    or a transformers teacher)."""
    tm = model.vision_model if tower == "image" else model.text_model
    block = tm.encoder.layers[layer]
    att = block.self_attn
    return (block.layer_norm1, att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias,
            att.num_heads)


def pooled_index(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Where a CLIP text tower pools: the first end-of-text token (the largest id for the legacy ``eos_token_id``
    2, as transformers and open_clip do)."""
    if eos_token_id is None or eos_token_id == 2:
        return input_ids.argmax(-1)
    return (input_ids == eos_token_id).int().argmax(-1)


@dataclass
class TeacherOutput:
    """What a teacher returns. Embeddings are projected and *not* normalised; see the ``*_normalized`` properties."""

    image_embeds: torch.Tensor | None = None  # (B, E)
    text_embeds: torch.Tensor | None = None  # (B, E)
    image_hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 tensors of (B, N, D), input to block 0 first
    text_hidden_states: tuple[torch.Tensor, ...] | None = None  # L+1 tensors of (B, T, D)
    logit_scale: torch.Tensor | None = None  # exp of the learned log scale, e.g. 100.0
    logits: torch.Tensor | None = None  # (B,) a matcher teacher's one logit per pair

    @property
    def image_embeds_normalized(self) -> torch.Tensor | None:
        return None if self.image_embeds is None else F.normalize(self.image_embeds, dim=-1)

    @property
    def text_embeds_normalized(self) -> torch.Tensor | None:
        return None if self.text_embeds is None else F.normalize(self.text_embeds, dim=-1)


class FrozenTeacher(nn.Module):
    """A teacher frozen for good: ``requires_grad=False`` everywhere, eval mode whatever ``.train()`` is asked, and
    ``requires_grad_(True)`` refused. Every teacher wrapper (CLIP teachers, the CLIP matcher) derives from it."""

    backend: str = ""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.name = name
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # Trainer and user code call .train() on everything they see; a teacher in train mode would apply
        # dropout / patch dropout to its targets, so it stays in eval mode whatever is asked.
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        if requires_grad:
            raise RuntimeError(
                f"Teacher {self.name!r} is frozen; build a new model from its weights to fine-tune it."
            )
        return super().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- identity (used to key caches and model cards) ------------------------------------------------------
    def weights_hash(self) -> str:
        """SHA-256 over every parameter and buffer (name, shape, dtype, bytes), in a stable order."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def summary(self) -> dict[str, Any]:
        """A JSON-able description for logs and model cards."""
        return {"name": self.name, "backend": self.backend, "parameters": self.num_parameters()}


class CLIPTeacher(FrozenTeacher, abc.ABC):
    """A frozen CLIP: projected image and text embeddings, hidden states on request, the logit scale and the
    teacher's own preprocessing. Subclasses implement ``_encode_image``, ``_encode_text`` and ``inputs``."""

    # -- encoding -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TeacherOutput:
        if pixel_values is None and input_ids is None:
            raise ValueError("Teacher forward needs pixel_values, input_ids or both.")
        out = TeacherOutput(logit_scale=self.logit_scale)
        if pixel_values is not None:
            out.image_embeds, out.image_hidden_states = self._encode_image(pixel_values, output_hidden_states)
        if input_ids is not None:
            out.text_embeds, out.text_hidden_states = self._encode_text(
                input_ids, attention_mask, output_hidden_states
            )
        return out

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb, _ = self._encode_image(pixel_values, False)
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        emb, _ = self._encode_text(input_ids, attention_mask, False)
        return F.normalize(emb, dim=-1) if normalize else emb

    @abc.abstractmethod
    def _encode_image(self, pixel_values, output_hidden_states):
        """(B, 3, H, W) -> projected (B, E) embeddings and, if asked, the hidden states."""

    @abc.abstractmethod
    def _encode_text(self, input_ids, attention_mask, output_hidden_states):
        """(B, T) ids -> projected (B, E) embeddings and, if asked, the hidden states."""

    @abc.abstractmethod
    def inputs(self) -> Preprocessing:
        """The teacher's own image preprocessing and tokenizer, without the weights."""

    @abc.abstractmethod
    def depths(self) -> dict[str, int]:
        """``{"vision": layers, "text": layers}`` of the teacher's transformer towers."""

    @abc.abstractmethod
    def hidden_widths(self) -> dict[str, int]:
        """``{"vision": width, "text": width}`` of the teacher's transformer towers (what its hidden states hold)."""

    @abc.abstractmethod
    def pooled_features(self, tower: str, last_hidden: torch.Tensor, input_ids: torch.Tensor | None = None
                        ) -> torch.Tensor:  # fmt: skip
        """The pre-projection pooled feature ``(B, D)`` of ``tower`` (``image`` / ``text``) from its last hidden
        state (``hidden_states[-1]``): what :meth:`projection` maps to the embedding."""

    @abc.abstractmethod
    def projection(self, tower: str) -> torch.Tensor:
        """The tower's projection as an ``(E, D)`` matrix: ``embedding = pooled_features @ projection.T``."""

    @abc.abstractmethod
    def attention_weights(self, tower: str, layer: int) -> tuple:
        """``(layer norm, Wq, bq, Wk, bk, heads)`` of a layer's self-attention, for
        :func:`mmkd.losses.features.attention_probs`."""

    #: where the text tower pools: the first token with this id (``None``: the largest id, open_clip's rule)
    eos_token_id: int | None = None

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp of the learned log scale (100 for OpenAI's CLIP)."""
        return self.model.logit_scale.detach().exp()

    @abc.abstractmethod
    def to_transformers(self) -> CLIPModel:
        """The teacher as a full-depth, trainable ``transformers.CLIPModel`` (a copy; exact conversion)."""

    @abc.abstractmethod
    def transformers_processor(self) -> CLIPProcessor:
        """The ``CLIPProcessor`` equal to the teacher's own preprocessing."""
