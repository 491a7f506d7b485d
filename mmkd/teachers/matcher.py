"""The CLIP matcher teacher of research 000 (section 3.1): a whole CLIP plus a head, one logit per (image, text) pair.

:class:`CLIPMatcher` is the model fine-tuned in the recipe's teacher stage: a stock ``transformers.CLIPModel`` with
either the calibrated similarity ``a·cos(u, v) + b`` ("cosine") or an MLP on ``[u, v, u⊙v, |u−v|]`` ("mlp") on its
two projected embeddings, a ``PreTrainedModel`` registered with ``AutoConfig`` / ``AutoModel``. Once fine-tuned it
is distilled from as a :class:`MatcherTeacher`, frozen like every other teacher.

    >>> model = CLIPMatcher.from_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", head="cosine")   # to fine-tune
    >>> teacher = load_teacher("out/match/teacher")                                                # to distil from
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from mmkd.checks import check_choice, check_positive_int
from mmkd.losses.match import hard_label_loss
from mmkd.teachers.base import FrozenTeacher, TeacherOutput

__all__ = ["CLIP_HEADS", "CLIPMatcher", "CLIPMatcherConfig", "MatcherModel", "MatcherOutput", "MatcherTeacher"]

# Outputs that Trainer's prediction_step leaves out, so compute_metrics sees the logits alone.
EMBEDDING_OUTPUTS = ["image_embeds", "text_embeds", "projected_image_embeds", "projected_text_embeds"]


CLIP_HEADS = ("cosine", "mlp")


@dataclass
class MatcherOutput(ModelOutput):
    """What both matchers return. With labels, ``loss`` comes first, so ``Trainer`` reads it as ``outputs[0]``."""

    loss: torch.Tensor | None = None  # scalar BCE-with-logits, when labels are given
    logits: torch.Tensor | None = None  # (B,) one logit per pair: > 0 means "match"
    image_embeds: torch.Tensor | None = None  # (B, D_img) what the head saw (teacher: raw CLIP projections)
    text_embeds: torch.Tensor | None = None  # (B, D_txt)
    projected_image_embeds: torch.Tensor | None = None  # (B, P) student with feature_projection_dim only
    projected_text_embeds: torch.Tensor | None = None  # (B, P)


# ----------------------------------------------------------------------------------------------------------------
# Teacher: a CLIP matcher
# ----------------------------------------------------------------------------------------------------------------
class CLIPMatcherConfig(PreTrainedConfig):
    """A ``CLIPConfig`` (``clip_config``, serialised as a dict) and the matching head on top of it.

    Args:
        clip_config: the CLIP's config (``CLIPConfig`` or its dict); default: transformers' default CLIP.
        head: ``cosine`` (``a·cos(u, v) + b``, learned ``a`` and ``b``) or ``mlp`` (MLP on ``[u, v, u⊙v, |u−v|]``
            of the normalised embeddings ``u``, ``v``).
        mlp_hidden_size: hidden width of the ``mlp`` head.
        init_scale, init_bias: initial ``a`` and ``b`` of the cosine head. ``10·cos − 3`` says "match" above a
            cosine of 0.3, about where CLIP separates matching from random captions.
        initializer_range: std of the head's linear layers at initialisation.
    """

    model_type = "mmkd_clip_matcher"
    sub_configs_defaults = {"clip_config": CLIPConfig}
    keys_to_ignore_at_inference = EMBEDDING_OUTPUTS

    clip_config: dict | CLIPConfig | None = None
    head: str = "cosine"
    mlp_hidden_size: int = 512
    init_scale: float = 10.0
    init_bias: float = -3.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        check_choice("head", self.head, CLIP_HEADS)
        check_positive_int("mlp_hidden_size", self.mlp_hidden_size)
        super().__post_init__(**kwargs)


class CosineMatchHead(nn.Module):
    """``logit = a·cos(u, v) + b``: CLIP's own similarity with a learned temperature and threshold."""

    def __init__(self, init_scale: float, init_bias: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        cos = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)  # (B,)
        return self.scale * cos + self.bias  # (B,)


class PairMLPHead(nn.Module):
    """``logit = MLP([u, v, u⊙v, |u−v|])`` on the normalised embeddings (the InferSent pair features)."""

    def __init__(self, embed_dim: int, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        u, v = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)  # (B, E) each
        pair = torch.cat([u, v, u * v, (u - v).abs()], dim=-1)  # (B, 4E)
        return self.net(pair).squeeze(-1)  # (B,)


class MatcherModel(PreTrainedModel):
    """What both binary matchers (this teacher, the ResNet + MiniLM student) share as ``PreTrainedModel`` s."""

    input_modalities = ("image", "text")
    # Their towers' (CLIP's, BERT's) attention backends, so the top-level choice does not force them to eager.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The loss is a mean over the pairs and ignores num_items_in_batch: Trainer must scale it for accumulation.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_linear(self, module: nn.Linear) -> None:
        """HF-style initialisation of the matcher's own linear layers (heads, fusion, projections)."""
        init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if module.bias is not None:
            init.zeros_(module.bias)


class CLIPMatcher(MatcherModel):
    """A whole CLIP plus a head giving one logit per (image, text) pair.

    ``self.clip`` is a stock ``CLIPModel``; its ``logit_scale`` is frozen because no head uses it (an unused trainable
    parameter gets no gradient, which DDP without ``find_unused_parameters`` rejects).
    """

    config_class = CLIPMatcherConfig

    def __init__(self, config: CLIPMatcherConfig):
        super().__init__(config)
        self.clip = CLIPModel(config.clip_config)
        embed_dim = config.clip_config.projection_dim
        if config.head == "cosine":
            self.head = CosineMatchHead(config.init_scale, config.init_bias)
        else:
            self.head = PairMLPHead(embed_dim, config.mlp_hidden_size)
        self.post_init()
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        self.clip.logit_scale.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        # Loading replaces the parameters built in __init__, and with them the frozen flag of the logit scale.
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze_unused()  # output_loading_info gives a tuple
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # CLIPModel initialises itself (post_init dispatches its own _init_weights); only the head is ours.
        if isinstance(module, CosineMatchHead):
            init.constant_(module.scale, self.config.init_scale)
            init.constant_(module.bias, self.config.init_bias)
        elif isinstance(module, nn.Linear):
            self._init_linear(module)

    @classmethod
    def from_clip(
        cls, clip: Any, head: str = "cosine", pretrained: str | None = None, **config_kwargs: Any
    ) -> CLIPMatcher:
        """A matcher whose CLIP starts from ``clip``'s weights, every parameter trainable but the unused logit scale.

        Args:
            clip: a ``transformers.CLIPModel`` (its weights are copied), an mmkd teacher, or a teacher spec for
                :func:`mmkd.teachers.load_teacher` (open_clip name, ``*.json`` config, ``hf-hub:``, transformers
                id or directory).
            head: ``cosine`` or ``mlp``.
            pretrained: open_clip pretrained tag or checkpoint, with a string ``clip`` only.
            config_kwargs: other :class:`CLIPMatcherConfig` fields (``mlp_hidden_size``, ``init_scale``, ...).
        """
        from mmkd.teachers import CLIPTeacher, load_teacher

        if isinstance(clip, (str, os.PathLike)):
            clip = load_teacher(str(clip), pretrained=pretrained)
        elif pretrained is not None:
            raise ValueError(
                f"pretrained={pretrained!r} applies to a teacher spec (a string); got a {type(clip).__name__}"
            )
        if isinstance(clip, CLIPTeacher):
            clip = clip.to_transformers()
        if not isinstance(clip, CLIPModel):
            raise TypeError(f"clip must be a CLIPModel, an mmkd teacher or a teacher spec, got {type(clip).__name__}")
        clip_config = copy.deepcopy(clip.config)
        clip_config.dtype = None  # the matcher is built in the default dtype: fp32 master weights for fine-tuning
        model = cls(CLIPMatcherConfig(clip_config=clip_config, head=head, **config_kwargs))
        # Construct first, then copy: post_init would otherwise re-initialise weights copied in earlier.
        model.clip.load_state_dict(clip.state_dict())
        model.requires_grad_(True)  # teachers come frozen
        model._freeze_unused()
        return model

    def encode(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The projected CLIP embeddings ``(B, E)`` of the images and texts, raw (not normalised)."""
        # get_*_features leave out CLIPModel.forward's normalisation and (B, B) similarity matrix.
        image_embeds = self.clip.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        text_embeds = self.clip.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).pooler_output
        return image_embeds, text_embeds  # (B, E), (B, E)

    def logits_from_embeddings(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """The head alone: raw ``(B, E)`` embeddings (e.g. cached ones) -> ``(B,)`` logits."""
        if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                "image_embeds and text_embeds must both be (batch, dim) of the same shape, got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        return self.head(image_embeds, text_embeds)  # (B,)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,  # other batch keys (e.g. token_type_ids, return_dict) are ignored
    ) -> MatcherOutput:
        image_embeds, text_embeds = self.encode(pixel_values, input_ids, attention_mask)
        logits = self.logits_from_embeddings(image_embeds, text_embeds)  # (B,)
        loss = None if labels is None else hard_label_loss(logits, labels)
        return MatcherOutput(loss=loss, logits=logits, image_embeds=image_embeds, text_embeds=text_embeds)


class MatcherTeacher(FrozenTeacher):
    """A fine-tuned :class:`CLIPMatcher` as a frozen teacher, with its ``CLIPProcessor``.

    ``forward`` gives the pair's logit and the CLIP embeddings the head saw; ``encode_image`` / ``encode_text`` give
    the embeddings alone, so the teacher-embedding cache (:mod:`mmkd.data.cache`) stores them and the trainer puts
    cached ones through :meth:`logits_from_embeddings` (the head alone) instead of running the CLIP.
    """

    backend = "clip_matcher"

    def __init__(self, model: CLIPMatcher, processor, name: str):
        super().__init__(model, name)
        self.processor = processor

    @torch.no_grad()
    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> TeacherOutput:
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        return TeacherOutput(image_embeds=out.image_embeds, text_embeds=out.text_embeds, logits=out.logits)

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.model.clip.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.clip.get_text_features(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            return_dict=True,
        ).pooler_output

    @torch.no_grad()
    def logits_from_embeddings(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        return self.model.logits_from_embeddings(image_embeds, text_embeds)

    def inputs(self):
        from mmkd.data.preprocessing import processor_preprocessing

        return processor_preprocessing(self.processor)


def claims(name_or_path: str) -> bool:
    """Whether ``load_teacher(..., backend="auto")`` reads ``name_or_path`` as a fine-tuned CLIP matcher: a folder
    whose ``config.json`` has ``model_type`` ``mmkd_clip_matcher``."""
    config = Path(name_or_path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == CLIPMatcherConfig.model_type
    except (OSError, json.JSONDecodeError):
        return False


def load(name_or_path: str, pretrained: str | None = None, cache_dir: str | None = None) -> MatcherTeacher:
    """A folder written by the match recipe's teacher stage (``CLIPMatcher`` + ``CLIPProcessor``)."""
    from transformers import CLIPProcessor

    if pretrained is not None:
        raise ValueError(f"teacher_pretrained={pretrained!r}: a CLIP matcher folder ({name_or_path!r}) holds its weights")
    model = CLIPMatcher.from_pretrained(name_or_path, cache_dir=cache_dir)
    return MatcherTeacher(model, CLIPProcessor.from_pretrained(name_or_path, cache_dir=cache_dir), name=name_or_path)


AutoConfig.register(CLIPMatcherConfig.model_type, CLIPMatcherConfig, exist_ok=True)
AutoModel.register(CLIPMatcherConfig, CLIPMatcher, exist_ok=True)
