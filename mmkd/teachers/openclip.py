"""The open_clip backend: an ``open_clip.CLIP`` with its validation transform and tokenizer, as a frozen teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.data.preprocessing import Preprocessing, TransformImages, vocab_signature
from mmkd.interop.preprocessing import image_signature_from_open_clip
from mmkd.teachers.base import CLIPTeacher

PREFIXES = ("hf-hub:", "local-dir:")


def claims(name_or_path: str) -> bool:
    """Whether ``load_teacher(..., backend="auto")`` gives ``name_or_path`` to open_clip: an ``hf-hub:`` /
    ``local-dir:`` id, a ``*.json`` model config, a folder with an ``open_clip_config.json``, or a model name
    open_clip knows (``ViT-B-32``)."""
    if name_or_path.startswith(PREFIXES) or name_or_path.endswith(".json"):
        return True
    path = Path(name_or_path)
    if path.is_dir():
        return (path / "open_clip_config.json").is_file()
    import open_clip

    return name_or_path in open_clip.list_models()


def trimmed_length(input_ids: torch.Tensor, pad_id: int = 0) -> int:
    """The batch's longest caption: one past the last column holding any token other than ``pad_id`` (open_clip's
    tokenizer pads with 0), at least 1."""
    used = (input_ids != pad_id).any(dim=0).nonzero()  # (columns with a token, 1)
    return int(used[-1]) + 1 if len(used) else 1


class _OpenCLIPTexts:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(texts)}  # (B, context_length)


class OpenCLIPTeacher(CLIPTeacher):
    """An ``open_clip.CLIP`` model with its validation transform and tokenizer."""

    backend = "open_clip"

    def __init__(self, model: nn.Module, preprocess, tokenizer, name: str):
        super().__init__(model, name)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.context_length = int(getattr(tokenizer, "context_length", 77))

    def pooled_features(self, tower, last_hidden, input_ids=None):
        if tower == "image":
            return self.model.visual._pool(last_hidden)[0]  # open_clip's own pooling (class token, ln_post)
        from open_clip.transformer import text_global_pool

        ids = input_ids.to(last_hidden.device)
        ids = F.pad(ids, (0, last_hidden.shape[1] - ids.shape[1]), value=0)  # as _encode_text padded them
        return text_global_pool(self.model.ln_final(last_hidden), ids, self.model.text_pool_type,
                                eos_token_id=getattr(self.model, "text_eos_id", None))

    def projection(self, tower):
        proj = self.model.visual.proj if tower == "image" else self.model.text_projection
        if isinstance(proj, nn.Linear):
            if proj.bias is not None:
                raise ValueError("the teacher's text projection has a bias; it cannot be folded into a CLIPModel")
            return proj.weight.detach()
        return proj.detach().T

    def attention_weights(self, tower, layer):
        block = (self.model.visual.transformer if tower == "image" else self.model.transformer).resblocks[layer]
        att = block.attn  # nn.MultiheadAttention: q, k, v stacked in in_proj
        d = att.embed_dim
        w, b = att.in_proj_weight, att.in_proj_bias
        return (block.ln_1, w[:d], None if b is None else b[:d], w[d : 2 * d], None if b is None else b[d : 2 * d],
                att.num_heads)

    def depths(self) -> dict[str, int]:
        return {"vision": len(self.model.visual.transformer.resblocks), "text": len(self.model.transformer.resblocks)}

    def hidden_widths(self) -> dict[str, int]:
        return {"vision": int(self.model.visual.transformer.width), "text": int(self.model.transformer.width)}

    @staticmethod
    def _run_with_hidden_states(transformer: nn.Module, fn):
        """Run ``fn`` while recording the input of the first block and the output of every block, as (B, L, D)."""
        states: list[torch.Tensor] = []
        # open_clip's Transformer records whether it runs (N, L, D) or (L, N, D); hidden states are batch-first.
        batch_first = getattr(transformer, "batch_first", True)

        def as_nld(x: torch.Tensor) -> torch.Tensor:
            return x if batch_first else x.transpose(0, 1)

        blocks = transformer.resblocks
        handles = [blocks[0].register_forward_pre_hook(lambda m, args: states.append(as_nld(args[0])))]
        for blk in blocks:
            handles.append(blk.register_forward_hook(lambda m, args, out: states.append(as_nld(out))))
        try:
            result = fn()
        finally:
            for h in handles:
                h.remove()
        return result, tuple(states)

    def _encode_image(self, pixel_values, output_hidden_states):
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if not output_hidden_states:
            return self.model.encode_image(pixel_values), None
        return self._run_with_hidden_states(
            self.model.visual.transformer, lambda: self.model.encode_image(pixel_values)
        )

    def _encode_text(self, input_ids, attention_mask, output_hidden_states):
        # open_clip pools at the argmax token id (the end-of-text token), so padding after it - whether open_clip's
        # zeros or a transformers tokenizer's pad id - changes nothing; the attention mask is implied by causality.
        input_ids = input_ids.to(self.device)
        if not self.trims_text:
            # A text tower that is not causal, or pools at the last position, sees every one of its context_length
            # positions: run it as open_clip does, ids padded up to the full positional table.
            if input_ids.shape[1] < self.context_length:
                input_ids = F.pad(input_ids, (0, self.context_length - input_ids.shape[1]), value=0)
            if not output_hidden_states:
                return self.model.encode_text(input_ids), None
            return self._run_with_hidden_states(self.model.transformer, lambda: self.model.encode_text(input_ids))
        if not output_hidden_states:
            # The batch's longest caption (the feature terms below read the states at the given positions instead).
            return self._encode_trimmed_text(input_ids[:, : trimmed_length(input_ids)]), None
        return self._run_with_hidden_states(self.model.transformer, lambda: self._encode_trimmed_text(input_ids))

    @property
    def trims_text(self) -> bool:
        """Whether the text tower may run on the batch's longest caption instead of all ``context_length``
        positions: a causal mask (position ``i`` sees only ``0..i``) and pooling at a token of the caption (the
        end-of-text token or the first), so the positions after the longest caption change no embedding."""
        model = self.model
        return (getattr(model, "attn_mask", None) is not None and hasattr(model, "positional_embedding")
                and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos", "first"))

    def _encode_trimmed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``open_clip.CLIP.encode_text`` on ``L <= context_length`` positions: the first ``L`` rows of the positional
        table and the top-left ``L x L`` block of the causal mask (the positions after ``L`` are never seen)."""
        model, length = self.model, input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"the teacher's text tower takes at most {self.context_length} tokens, got {length}")
        from open_clip.transformer import text_global_pool

        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(input_ids).to(cast_dtype)  # (B, L, D)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)  # (B, L, D)
        x = text_global_pool(x, input_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    # -- preprocessing --------------------------------------------------------------------------------------
    def inputs(self) -> Preprocessing:
        import open_clip

        return Preprocessing(
            TransformImages(self.preprocess),
            _OpenCLIPTexts(self.tokenizer),
            image_signature_from_open_clip(open_clip.get_model_preprocess_cfg(self.model)),
            vocab_signature(self.tokenizer.encoder, self.context_length),
        )

    def to_transformers(self):
        """The teacher as a full-depth ``transformers.CLIPModel`` (exact weight conversion)."""
        from mmkd.interop.to_transformers import open_clip_to_transformers

        return open_clip_to_transformers(self.model)

    def transformers_processor(self):
        from mmkd.interop.to_transformers import open_clip_processor

        return open_clip_processor(self.model)


def load(name_or_path: str, pretrained: str | None = None, cache_dir: str | None = None) -> OpenCLIPTeacher:
    """An open_clip model name, ``hf-hub:`` / ``local-dir:`` id or ``*.json`` config, with optional weights."""
    import open_clip

    model_name = name_or_path
    if name_or_path.endswith(".json"):
        cfg_path = Path(name_or_path)
        if not cfg_path.is_file():
            raise FileNotFoundError(f"open_clip model config {name_or_path!r} does not exist.")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"open_clip model config {name_or_path!r} is not valid JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"open_clip model config {name_or_path!r} lacks the field(s) {missing}.")
        open_clip.add_model_config(cfg_path)
        model_name = cfg_path.stem
    if pretrained is not None and not name_or_path.startswith(("hf-hub:", "local-dir:")):
        is_path = any(sep in pretrained for sep in ("/", "\\")) or pretrained.endswith((".pt", ".bin", ".safetensors"))
        if is_path and not Path(pretrained).is_file():
            raise FileNotFoundError(f"teacher checkpoint {pretrained!r} does not exist.")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, cache_dir=cache_dir
    )
    tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    name = model_name if pretrained is None else f"{model_name}/{Path(pretrained).name}"
    return OpenCLIPTeacher(model, preprocess, tokenizer, name=name)
