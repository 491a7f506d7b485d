"""One encoding interface over everything mmkd evaluates: students, teachers, open_clip and transformers models.

``load_encoder`` accepts
* a string: anything :func:`mmkd.teachers.load_teacher` takes — a transformers ``CLIPModel`` directory or hub id
  (mmkd's students included), an open_clip name with ``pretrained`` tag or checkpoint, ``hf-hub:…``, a ``*.json``
  open_clip config;
* an mmkd :class:`~mmkd.teachers.CLIPTeacher`;
* a live ``transformers.CLIPModel`` plus its processor (a student being trained: it is evaluated under
  ``no_grad`` in eval mode and put back in the mode it was in; its parameters are left alone);
* with ``backend="onnxruntime"`` (or ``"onnxruntime-int8"``), the folder ``mmkd export --format onnx`` wrote:
  its encoders run by onnxruntime (:class:`ONNXEncoder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.data.preprocessing import Preprocessing, processor_preprocessing
from mmkd.teachers import BACKEND_CHOICES, CLIPTeacher, load_teacher


class CLIPEncoder:
    """Normalised image and text embeddings from a CLIP model, with the model's own preprocessing."""

    def __init__(self, model: nn.Module, inputs: Preprocessing, name: str, image_fn, text_fn):
        self.model = model
        self.inputs = inputs
        self.name = name
        self._image_fn = image_fn  # (B, 3, H, W) on device -> (B, E)
        self._text_fn = text_fn  # dict of (B, T) on device -> (B, E)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> CLIPEncoder:
        self.model.to(device)
        return self

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.model.training
        # A CLIPTeacher stays in eval mode whatever is asked; a live student goes back to training afterwards.
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) pixel values, the model's own transform."""
        return self.inputs.images(images)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> L2-normalised (B, E) float32 embeddings on the model's device."""
        with self._inference():
            emb = self._image_fn(pixel_values.to(device=self.device, dtype=self.dtype))
        return F.normalize(emb.float(), dim=-1)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> L2-normalised (N, E) float32 embeddings, tokenized and encoded in batches."""
        out = []
        with self._inference():
            for i in range(0, len(texts), batch_size):
                tokens = self.inputs.texts(texts[i : i + batch_size])
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                out.append(F.normalize(self._text_fn(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0)


def _from_teacher(teacher: CLIPTeacher) -> CLIPEncoder:
    return CLIPEncoder(
        teacher,
        teacher.inputs(),
        teacher.name,
        lambda px: teacher.encode_image(px),
        lambda tok: teacher.encode_text(tok["input_ids"], tok.get("attention_mask")),
    )


def _from_clip_model(model: nn.Module, processor, name: str) -> CLIPEncoder:
    inputs = processor_preprocessing(processor, int(model.config.text_config.max_position_embeddings))

    # get_*_features' pooler_output is the raw projected embedding (transformers 5)
    def image_fn(px):
        return model.get_image_features(pixel_values=px).pooler_output

    def text_fn(tok):
        return model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask")).pooler_output

    return CLIPEncoder(model, inputs, name, image_fn, text_fn)


class ONNXEncoder(CLIPEncoder):
    """The encoders ``mmkd export --format onnx`` writes (:mod:`mmkd.interop.to_onnx`), run by onnxruntime's CPU
    execution provider; the same interface and normalisation as every other :class:`CLIPEncoder`."""

    def __init__(self, folder: str | Path, int8: bool = False):
        from transformers import CLIPProcessor

        from mmkd.interop.to_onnx import ONNXCLIP

        onnx = self.onnx = ONNXCLIP(folder, int8=int8)

        def text_fn(tok):
            return onnx.get_text_features(tok["input_ids"], tok.get("attention_mask"))

        inputs = processor_preprocessing(CLIPProcessor.from_pretrained(folder), int(onnx.metadata["context_length"]))
        super().__init__(None, inputs, str(folder) + (" (onnxruntime int8)" if int8 else " (onnxruntime)"),
                         onnx.get_image_features, text_fn)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def to(self, device) -> ONNXEncoder:
        return self  # onnxruntime's CPU execution provider: the inputs are moved to the CPU by encode_*

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        yield


ENCODER_BACKENDS = (*BACKEND_CHOICES, "onnxruntime", "onnxruntime-int8")


def load_encoder(
    model,
    *,
    pretrained: str | None = None,
    processor=None,
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> CLIPEncoder:
    """Wrap ``model`` (see the module docstring) as a :class:`CLIPEncoder`, optionally moved to ``device``.
    ``backend``: ``auto`` / ``open_clip`` / ``transformers`` (how a string is loaded, :func:`load_teacher`), or
    ``onnxruntime`` / ``onnxruntime-int8``: ``model`` is a folder written by ``mmkd export --format onnx``."""
    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(ENCODER_BACKENDS)}")
    if backend.startswith("onnxruntime"):
        if not isinstance(model, (str, Path)):
            raise TypeError(f"backend={backend!r} takes the folder `mmkd export --format onnx` wrote, not a "
                            f"{type(model).__name__}")
        return ONNXEncoder(model, int8=backend.endswith("int8"))
    if isinstance(model, CLIPEncoder):
        enc = model
    elif isinstance(model, CLIPTeacher):
        enc = _from_teacher(model)
    elif isinstance(model, str):
        enc = _from_teacher(load_teacher(model, pretrained=pretrained, backend=backend))
    elif hasattr(model, "vision_model") and hasattr(model, "text_model") and hasattr(model, "visual_projection"):
        if processor is None:
            raise ValueError("a transformers CLIPModel object needs its processor: load_encoder(model, processor=...)")
        enc = _from_clip_model(model, processor, getattr(model.config, "_name_or_path", "") or "CLIPModel")
    else:
        raise TypeError(
            f"cannot evaluate a {type(model).__name__}: pass a model directory / hub id / open_clip name, "
            "an mmkd CLIPTeacher, or a transformers CLIPModel with its processor"
        )
    if device is not None:
        enc.to(device)
    return enc


__all__ = ["ENCODER_BACKENDS", "CLIPEncoder", "ONNXEncoder", "load_encoder"]
