"""The transformers backend: a ``transformers.CLIPModel`` with its ``CLIPProcessor``, as a frozen teacher."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from mmkd.data.preprocessing import Preprocessing, processor_preprocessing
from mmkd.teachers.base import CLIPTeacher, clip_attention_weights, pooled_index


def claims(name_or_path: str) -> bool:
    """Whether ``load_teacher(..., backend="auto")`` gives ``name_or_path`` to transformers: a folder holding a CLIP
    ``config.json`` (``model_type`` ``clip``), or anything that is not a folder (a hub id)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, json.JSONDecodeError):
        return False


class TransformersCLIPTeacher(CLIPTeacher):
    """A ``transformers.CLIPModel`` with its ``CLIPProcessor``."""

    backend = "transformers"

    def __init__(self, model: nn.Module, processor, name: str):
        super().__init__(model, name)
        self.processor = processor
        self.context_length = int(model.config.text_config.max_position_embeddings)
        eos = model.config.text_config.eos_token_id
        self.eos_token_id = None if eos == 2 else eos  # transformers' legacy id 2 means "pool at the largest id"

    def pooled_features(self, tower, last_hidden, input_ids=None):
        if tower == "image":
            return self.model.vision_model.post_layernorm(last_hidden[:, 0])
        x = self.model.text_model.final_layer_norm(last_hidden)
        return x[torch.arange(x.shape[0], device=x.device), pooled_index(input_ids, self.eos_token_id).to(x.device)]

    def projection(self, tower):
        return (self.model.visual_projection if tower == "image" else self.model.text_projection).weight.detach()

    def attention_weights(self, tower, layer):
        return clip_attention_weights(self.model, tower, layer)

    def depths(self) -> dict[str, int]:
        cfg = self.model.config
        return {"vision": int(cfg.vision_config.num_hidden_layers), "text": int(cfg.text_config.num_hidden_layers)}

    def hidden_widths(self) -> dict[str, int]:
        cfg = self.model.config
        return {"vision": int(cfg.vision_config.hidden_size), "text": int(cfg.text_config.hidden_size)}

    def _encode_image(self, pixel_values, output_hidden_states):
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        # get_image_features' pooler_output is the raw projected embedding (transformers 5)
        out = self.model.get_image_features(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        return out.pooler_output, (tuple(out.hidden_states) if output_hidden_states else None)

    def _encode_text(self, input_ids, attention_mask, output_hidden_states):
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out = self.model.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        return out.pooler_output, (tuple(out.hidden_states) if output_hidden_states else None)

    def inputs(self) -> Preprocessing:
        return processor_preprocessing(self.processor, self.context_length)

    def to_transformers(self):
        model = copy.deepcopy(self.model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def transformers_processor(self):
        return self.processor


def load(name_or_path: str, pretrained: str | None = None, cache_dir: str | None = None) -> TransformersCLIPTeacher:
    """A transformers ``CLIPModel`` hub id or folder, with its ``CLIPProcessor``."""
    if pretrained is not None:
        raise ValueError(
            f"teacher_pretrained={pretrained!r} is an open_clip option; a transformers teacher "
            f"({name_or_path!r}) takes its weights from the hub id or directory itself."
        )
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(name_or_path, cache_dir=cache_dir)
    processor = CLIPProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
    return TransformersCLIPTeacher(model, processor, name=name_or_path)
