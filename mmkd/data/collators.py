"""Turn image-text examples into the model's inputs and, for distillation, the teacher's.

A distillation batch carries two input sets: the trained model's under the usual names (``pixel_values``,
``input_ids``, ``attention_mask``, ``token_type_ids``) and the teacher's under ``teacher_`` names, each made with
the model's own :class:`~mmkd.data.preprocessing.Preprocessing` -- except where both would be the same: when the
teacher's image transform equals the student's (same resize, crop, mean, std and resampling) the pixels are
computed once, and when both tokenizers have the same vocabulary and context length the ids are computed once.
Students built from their teacher share both, so a batch is preprocessed once.

Examples that already hold the teacher's embeddings (``teacher_image_embeds`` / ``teacher_text_embeds`` columns from
the embedding cache, :mod:`mmkd.data.cache`) are passed through as tensors, and no teacher inputs are built for that
tower.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmkd.data.preprocessing import Preprocessing, processor_preprocessing
from mmkd.data.sidecars import VIEW_COLUMN, apply_view

logger = logging.getLogger(__name__)

__all__ = ["CACHE_COLUMNS", "CLIPDistillationCollator", "ImageTextCollator", "MatchCollator"]

CACHE_COLUMNS = {"image": "teacher_image_embeds", "text": "teacher_text_embeds"}


class ImageTextCollator:
    """Batch examples with an image and a caption (and a 0/1 ``label_column``, if given).

    Args:
        inputs: the preprocessing of the model being trained.
        teacher_inputs: the teacher's, for distillation (``None``: no teacher inputs).
        image_column, text_column, label_column: the example keys; ``labels`` becomes a float tensor of 0/1.
        class_column: a column of class indices (a ``ClassLabel``), batched as ``class_labels`` (int64) for the
            zero-shot class-logit terms.
    """

    def __init__(
        self,
        inputs: Preprocessing,
        teacher_inputs: Preprocessing | None = None,
        image_column: str = "image",
        text_column: str = "text",
        label_column: str | None = None,
        class_column: str | None = None,
    ):
        self.inputs, self.teacher_inputs = inputs, teacher_inputs
        self.class_column = class_column
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.share_images = self.share_text = False
        if teacher_inputs is not None:
            self.share_images = teacher_inputs.image_signature == inputs.image_signature
            self.share_text = teacher_inputs.text_signature == inputs.text_signature
            logger.info(
                "Collator: teacher %s the student's image preprocessing and %s its tokenizer.",
                "shares" if self.share_images else "does not share",
                "shares" if self.share_text else "does not share",
            )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        columns = [self.image_column, self.text_column] + [c for c in (self.label_column, self.class_column) if c]
        for col in columns:
            if col not in examples[0]:
                raise KeyError(
                    f"Example has no column {col!r} (it has {sorted(examples[0])}); set image_column / text_column."
                )
        images = [ex[self.image_column] for ex in examples]
        if VIEW_COLUMN in examples[0]:  # a teacher sidecar's augmented view: cut exactly the pixels it embedded
            images = [apply_view(image, ex[VIEW_COLUMN]) for image, ex in zip(images, examples, strict=True)]
        texts = [ex[self.text_column] for ex in examples]
        batch: dict[str, torch.Tensor] = {"pixel_values": self.inputs.images(images), **self.inputs.texts(texts)}
        if self.label_column:
            labels = [ex[self.label_column] for ex in examples]
            if any(y not in (0, 1) for y in labels):
                raise ValueError(f"labels must be 0 (mismatch) or 1 (match), got {sorted(set(labels))}")
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)  # (B,)
        if self.class_column:
            batch["class_labels"] = torch.tensor([ex[self.class_column] for ex in examples], dtype=torch.long)

        cached = {c: torch.as_tensor([ex[c] for ex in examples]) for c in CACHE_COLUMNS.values() if c in examples[0]}
        batch.update(cached)
        if self.teacher_inputs is None:
            return batch
        if CACHE_COLUMNS["image"] not in cached and not self.share_images:
            batch["teacher_pixel_values"] = self.teacher_inputs.images(images)
        if CACHE_COLUMNS["text"] not in cached and not self.share_text:
            batch.update({f"teacher_{k}": v for k, v in self.teacher_inputs.texts(texts).items()})
        return batch


class CLIPDistillationCollator(ImageTextCollator):
    """The CLIP student's batches: its ``CLIPProcessor`` for the student, ``teacher_inputs`` (``teacher.inputs()``)
    for the teacher."""

    def __init__(
        self,
        processor,
        teacher_inputs: Preprocessing | None = None,
        image_column: str = "image",
        text_column: str = "text",
        class_column: str | None = None,
    ):
        self.processor = processor
        super().__init__(processor_preprocessing(processor), teacher_inputs, image_column, text_column,
                         class_column=class_column)


class MatchCollator(ImageTextCollator):
    """A matcher's batches of ``(image, text, label)`` examples: ``inputs`` of the model being trained
    (``ResNetMiniLMMatcher.preprocessing(tokenizer)``, or the CLIP matcher's ``processor_preprocessing(processor)``)
    and, for distillation, the teacher's. Column names as :class:`ImageTextCollator`'s; ``label_column="label"``."""

    def __init__(self, inputs: Preprocessing, teacher_inputs: Preprocessing | None = None, **columns: str):
        super().__init__(inputs, teacher_inputs, **{"label_column": "label", **columns})
