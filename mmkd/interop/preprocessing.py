"""open_clip <-> transformers preprocessing: one home for how the two libraries describe an image transform.

:func:`image_signature_from_processor` and :func:`image_signature_from_open_clip` put a transformers image processor
and an open_clip preprocess config into the same comparable form (a collator computes the teacher's pixels once
when they match the student's; the teacher cache keys on them).
"""

from __future__ import annotations

from typing import Any

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def image_signature_from_processor(image_processor) -> dict[str, Any]:
    """What a transformers CLIP image processor does to an image, in comparable form."""
    size, crop = image_processor.size, image_processor.crop_size
    shortest = size.get("shortest_edge") if hasattr(size, "get") else size["shortest_edge"]
    resample = image_processor.resample
    resample = _RESAMPLE_NAMES.get(int(resample), str(resample)) if resample is not None else None
    return {
        "resize_shortest_edge": int(shortest) if shortest is not None else None,
        "crop": (int(crop["height"]), int(crop["width"])),
        "mean": _rounded(image_processor.image_mean),
        "std": _rounded(image_processor.image_std),
        "resample": resample,
    }


def image_signature_from_open_clip(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    """What open_clip's validation transform does to an image, in the same form as the function above."""
    size = preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shortest = min(h, w) if preprocess_cfg.get("resize_mode", "shortest") == "shortest" else None
    return {
        "resize_shortest_edge": shortest,
        "crop": (int(h), int(w)),
        "mean": _rounded(preprocess_cfg["mean"]),
        "std": _rounded(preprocess_cfg["std"]),
        "resample": preprocess_cfg.get("interpolation", "bicubic"),
    }

