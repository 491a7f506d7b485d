"""One (image, text, label) example -> the inputs of the model being trained and, for distillation, the teacher's.

The student (ResNet + MiniLM) and the teacher (a CLIP matcher) see the same pair through different image transforms
and tokenizers, so a distillation batch carries two input sets: the student's under the usual names
(``pixel_values``, ``input_ids``, ``attention_mask``, ``token_type_ids``) and the teacher's under ``teacher_``
names. Cached teacher outputs in the examples (``teacher_logits`` or the embedding cache's
``teacher_image_embeds`` / ``teacher_text_embeds``) are passed through instead of the teacher's inputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mmkd.data.collator import CACHE_COLUMNS
from mmkd.teachers import TeacherInputs, processor_inputs

TEACHER_LOGITS = "teacher_logits"


class _TransformImages:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(img.convert("RGB")) for img in images])  # (B, 3, H, W)


class _TokenizerTexts:
    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def student_inputs(model, tokenizer) -> TeacherInputs:
    """The preprocessing of a :class:`~mmkd.matching.ResNetMiniLMMatcher`: its deterministic image transform and
    its MiniLM tokenizer (padding to the longest text, truncation at ``config.text_max_length``)."""
    cfg = model.config
    image_signature = {"size": cfg.image_size, "mean": list(cfg.image_mean), "std": list(cfg.image_std)}
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    return TeacherInputs(
        _TransformImages(model.image_transform()),
        _TokenizerTexts(tokenizer, cfg.text_max_length),
        image_signature,
        f"{vocab}:{cfg.text_max_length}",
    )


def clip_inputs(processor) -> TeacherInputs:
    """The preprocessing of a CLIP matcher: its ``CLIPProcessor`` (context length from the tokenizer)."""
    return processor_inputs(processor, int(getattr(processor.tokenizer, "model_max_length", 77) or 77))


class MatchCollator:
    """Batch ``(image, text, label)`` examples.

    Args:
        inputs: the preprocessing of the model being trained (:func:`student_inputs` or :func:`clip_inputs`).
        teacher_inputs: the teacher's, for distillation; its tensors get a ``teacher_`` prefix.
        image_column, text_column, label_column: the example keys. ``labels`` is a float tensor of 0/1.
    """

    def __init__(
        self,
        inputs: TeacherInputs,
        teacher_inputs: TeacherInputs | None = None,
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "label",
    ):
        self.inputs, self.teacher_inputs = inputs, teacher_inputs
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for col in (self.image_column, self.text_column, self.label_column):
            if col not in examples[0]:
                raise KeyError(f"example has no column {col!r} (it has {sorted(examples[0])})")
        images = [ex[self.image_column] for ex in examples]
        texts = [ex[self.text_column] for ex in examples]
        labels = [ex[self.label_column] for ex in examples]
        if any(y not in (0, 1) for y in labels):
            raise ValueError(f"labels must be 0 (mismatch) or 1 (match), got {sorted(set(labels))}")
        batch: dict[str, torch.Tensor] = {"pixel_values": self.inputs.images(images), **self.inputs.texts(texts)}
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)  # (B,)
        if TEACHER_LOGITS in examples[0]:
            batch[TEACHER_LOGITS] = torch.tensor([float(ex[TEACHER_LOGITS]) for ex in examples])
            return batch
        cached = {c: torch.as_tensor([ex[c] for ex in examples]) for c in CACHE_COLUMNS if c in examples[0]}
        batch.update(cached)
        if self.teacher_inputs is not None and len(cached) < len(CACHE_COLUMNS):
            batch["teacher_pixel_values"] = self.teacher_inputs.images(images)
            batch.update({f"teacher_{k}": v for k, v in self.teacher_inputs.texts(texts).items()})
        return batch
