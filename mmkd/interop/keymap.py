"""The open_clip <-> transformers CLIP state-dict key table: ONE table, applied in both directions.

Each entry pairs an open_clip name with transformers name(s) and a transform with an exact inverse:

* ``identity``;
* ``transpose`` -- open_clip's projections are ``(width, embed)`` parameters used as ``x @ proj``,
  transformers' are ``nn.Linear`` weights ``(embed, width)``;
* ``scalar`` -- ``logit_scale`` as a 0-d tensor;
* ``qkv`` -- open_clip's fused ``nn.MultiheadAttention`` ``in_proj_weight`` / ``in_proj_bias`` (rows
  ``[q; k; v]``) <-> transformers' separate ``q_proj`` / ``k_proj`` / ``v_proj``.

Both functions are strict: every source tensor is used and every target tensor produced, or
:class:`KeyMapError` names the missing / unmapped keys -- nothing is silently dropped. Values are never changed
(round trips are bitwise identities).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "KeyMapError",
    "KeyMapEntry",
    "hf_to_open_clip_state_dict",
    "key_table",
    "open_clip_to_hf_state_dict",
]

IDENTITY, TRANSPOSE, SCALAR, QKV = "identity", "transpose", "scalar", "qkv"

#: (open_clip name, transformers name, transform) outside the residual blocks.
_TOP_LEVEL = (
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", IDENTITY),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", IDENTITY),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", IDENTITY),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", IDENTITY),  # sic: transformers' spelling
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", IDENTITY),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", IDENTITY),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", IDENTITY),
    ("visual.proj", "visual_projection.weight", TRANSPOSE),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", IDENTITY),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", IDENTITY),
    ("ln_final.weight", "text_model.final_layer_norm.weight", IDENTITY),
    ("ln_final.bias", "text_model.final_layer_norm.bias", IDENTITY),
    ("text_projection", "text_projection.weight", TRANSPOSE),
    ("logit_scale", "logit_scale", SCALAR),
)

#: the same for one residual block, relative to the block prefixes of :data:`_TOWERS`; ``{}`` is q, k, v.
_BLOCK = (
    ("ln_1.weight", "layer_norm1.weight", IDENTITY),
    ("ln_1.bias", "layer_norm1.bias", IDENTITY),
    ("attn.in_proj_weight", "self_attn.{}_proj.weight", QKV),
    ("attn.in_proj_bias", "self_attn.{}_proj.bias", QKV),
    ("attn.out_proj.weight", "self_attn.out_proj.weight", IDENTITY),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", IDENTITY),
    ("ln_2.weight", "layer_norm2.weight", IDENTITY),
    ("ln_2.bias", "layer_norm2.bias", IDENTITY),
    ("mlp.c_fc.weight", "mlp.fc1.weight", IDENTITY),
    ("mlp.c_fc.bias", "mlp.fc1.bias", IDENTITY),
    ("mlp.c_proj.weight", "mlp.fc2.weight", IDENTITY),
    ("mlp.c_proj.bias", "mlp.fc2.bias", IDENTITY),
)

#: block prefixes (open_clip, transformers) of the vision and the text tower.
_TOWERS = (
    ("visual.transformer.resblocks", "vision_model.encoder.layers"),
    ("transformer.resblocks", "text_model.encoder.layers"),
)

#: transformers keys without an open_clip counterpart that carry no weights: the ``position_ids`` index
#: buffers (non-persistent in transformers 5, saved by older versions / subclasses).
_HF_INDEX_BUFFER_SUFFIX = "position_ids"


@dataclass(frozen=True)
class KeyMapEntry:
    open_clip: str
    hf: tuple[str, ...]  # one name; three (q, k, v) for "qkv"
    transform: str


def _shown(keys: list[str], n: int = 8) -> str:
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


class KeyMapError(ValueError):
    """A state dict the table does not cover exactly: ``missing`` (table order) / ``unmapped`` (sorted) keys."""

    def __init__(self, source: str, missing: list[str], unmapped: list[str]):
        self.missing, self.unmapped = missing, unmapped
        parts = [f"missing {_shown(missing)}"] if missing else []
        parts += [f"no counterpart for {_shown(unmapped)}"] if unmapped else []
        super().__init__(f"{source} state dict does not match the open_clip <-> transformers key table: "
                         + "; ".join(parts))


def key_table(n_vision_layers: int, n_text_layers: int) -> list[KeyMapEntry]:
    """Every entry for a CLIP with the given numbers of residual blocks per tower."""
    entries = [KeyMapEntry(oc, (hf,), t) for oc, hf, t in _TOP_LEVEL]
    for (oc_prefix, hf_prefix), layers in zip(_TOWERS, (n_vision_layers, n_text_layers), strict=True):
        for i in range(int(layers)):
            for oc, hf, t in _BLOCK:
                names = tuple(hf.format(x) for x in "qkv") if t == QKV else (hf,)
                hf_names = tuple(f"{hf_prefix}.{i}.{n}" for n in names)
                entries.append(KeyMapEntry(f"{oc_prefix}.{i}.{oc}", hf_names, t))
    return entries


def _to_hf(t: torch.Tensor, transform: str) -> tuple[torch.Tensor, ...]:
    if transform == IDENTITY:
        return (t,)
    if transform == TRANSPOSE:
        return (t.t(),)
    if transform == SCALAR:
        return (t.reshape(()),)
    if t.shape[0] % 3:
        raise ValueError(f"a fused q/k/v tensor of shape {tuple(t.shape)} does not split into three")
    return t.chunk(3, dim=0)


def _to_open_clip(ts: tuple[torch.Tensor, ...], transform: str) -> torch.Tensor:
    if transform == QKV:
        return torch.cat(ts)
    (t,) = ts
    return t.t() if transform == TRANSPOSE else t.reshape(()) if transform == SCALAR else t


def _check(source: str, sd: Mapping[str, torch.Tensor], wanted: list[str], ignored=lambda key: False) -> None:
    wanted_set = set(wanted)
    missing = [k for k in wanted if k not in sd]
    unmapped = sorted(k for k in sd if k not in wanted_set and not ignored(k))
    if missing or unmapped:
        raise KeyMapError(source, missing, unmapped)


def open_clip_to_hf_state_dict(
    oc_sd: Mapping[str, torch.Tensor], n_vision_layers: int, n_text_layers: int
) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` state dict in transformers ``CLIPModel`` names and layouts."""
    table = key_table(n_vision_layers, n_text_layers)
    _check("the open_clip", oc_sd, [e.open_clip for e in table])
    out: dict[str, torch.Tensor] = {}
    for e in table:
        out.update(zip(e.hf, _to_hf(oc_sd[e.open_clip], e.transform), strict=True))
    return out


def hf_to_open_clip_state_dict(
    hf_sd: Mapping[str, torch.Tensor], n_vision_layers: int, n_text_layers: int
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict in open_clip names and layouts (``position_ids`` skipped)."""
    table = key_table(n_vision_layers, n_text_layers)
    _check("the transformers", hf_sd, [k for e in table for k in e.hf],
           ignored=lambda key: key.endswith(_HF_INDEX_BUFFER_SUFFIX))
    return {e.open_clip: _to_open_clip(tuple(hf_sd[k] for k in e.hf), e.transform) for e in table}
