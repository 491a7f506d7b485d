"""A model's preprocessing without its weights: images -> pixel tensors, texts -> token tensors.

Every model mmkd trains or distils from (an open_clip or transformers teacher, a CLIP student, the ResNet + MiniLM
matcher) describes its inputs as a :class:`Preprocessing`. It is cheap to pickle into data-loader workers, and its
two signatures say when two models preprocess alike, so a collator computes shared inputs once and a cache knows
what its embeddings were computed from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mmkd.interop.preprocessing import image_signature_from_processor

__all__ = [
    "Preprocessing",
    "ProcessorImages",
    "TokenizerTexts",
    "TransformImages",
    "processor_preprocessing",
    "tokenizer_preprocessing",
    "vocab_signature",
]

# open_clip's SimpleTokenizer and transformers' CLIPTokenizer spell the two special tokens differently.
_SPECIAL_ALIASES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def vocab_signature(vocab: dict[str, int], context_length: int) -> str:
    """A hash of a vocabulary and context length: equal signatures tokenize to the same ids."""
    items = sorted((_SPECIAL_ALIASES.get(tok, tok), i) for tok, i in vocab.items())
    h = hashlib.sha256(json.dumps(items).encode())
    h.update(str(context_length).encode())
    return h.hexdigest()


class Preprocessing:
    """The two input functions of a model and what they do, in comparable form."""

    def __init__(self, image_fn, text_fn, image_signature: dict[str, Any], text_signature: str):
        self.image_fn = image_fn
        self.text_fn = text_fn
        self.image_signature = image_signature
        self.text_signature = text_signature

    def images(self, images: list) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) pixel values."""
        return self.image_fn(images)

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> ``input_ids`` (B, T) and, when the tokenizer makes them, ``attention_mask`` / ``token_type_ids``."""
        return self.text_fn(texts)


class TransformImages:
    """A per-image transform (torchvision or open_clip's) over a list of images, stacked."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(img.convert("RGB")) for img in images])  # (B, 3, H, W)


class ProcessorImages:
    """A transformers image processor over a list of images."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images: list) -> torch.Tensor:
        return self.image_processor(images=[img.convert("RGB") for img in images], return_tensors="pt")[
            "pixel_values"
        ]


class TokenizerTexts:
    """A transformers tokenizer padding to the longest text of the batch and truncating at ``max_length``."""

    keys = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: enc[k] for k in self.keys if k in enc}


def processor_preprocessing(processor, context_length: int | None = None) -> Preprocessing:
    """The preprocessing of a transformers ``CLIPProcessor`` (image processor + tokenizer); the context length
    defaults to the tokenizer's ``model_max_length``."""
    tok = processor.tokenizer
    if context_length is None:
        context_length = int(getattr(tok, "model_max_length", 77) or 77)
    return Preprocessing(
        ProcessorImages(processor.image_processor),
        TokenizerTexts(tok, context_length),
        image_signature_from_processor(processor.image_processor),
        vocab_signature(tok.get_vocab(), context_length),
    )


def tokenizer_preprocessing(transform, image_signature: dict[str, Any], tokenizer, max_length: int) -> Preprocessing:
    """The preprocessing of a model with a per-image ``transform`` and a transformers ``tokenizer``."""
    return Preprocessing(
        TransformImages(transform),
        TokenizerTexts(tokenizer, max_length),
        image_signature,
        vocab_signature(tokenizer.get_vocab(), max_length),
    )
