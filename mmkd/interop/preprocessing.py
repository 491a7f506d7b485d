"""open_clip <-> transformers image preprocessing: the one place the two descriptions are mapped.

* :func:`image_processor_from_open_clip` -- open_clip preprocess config -> ``CLIPImageProcessor``;
* :func:`preprocess_cfg_from_image_processor` -- the inverse, for exports to open_clip;
* :func:`image_signature_from_processor` / :func:`image_signature_from_open_clip` -- both in one comparable
  form (a collator computes the teacher's pixels once when they match the student's; the teacher cache keys
  on them).

Anything one side cannot express raises ``ValueError`` naming it. Missing values default as in open_clip
(OpenAI mean/std, bicubic, shortest-edge resize + centre crop).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "PREPROCESS_CONFIG_KEY",
    "image_processor_from_open_clip",
    "image_signature_from_open_clip",
    "image_signature_from_processor",
    "preprocess_cfg_from_image_processor",
]

#: key under which a converted model's config records the teacher's image preprocessing (plain JSON data,
#: ignored by ``CLIPModel``; read back by :func:`image_processor_from_open_clip` and the open_clip export).
PREPROCESS_CONFIG_KEY = "open_clip_preprocess_cfg"

#: PIL / transformers resampling codes (``PILImageResampling``) and their names (open_clip's among them).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE_CODES = {name: code for code, name in _RESAMPLE_NAMES.items()}
#: the interpolations open_clip's inference transform has ('random' is bicubic at inference).
_OPEN_CLIP_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}


def _rgb(values: Any, name: str) -> list[float]:
    """Three floats (a scalar is repeated), or ``ValueError``."""
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {values}")
    return values


def _with_open_clip_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """mean / std / interpolation / resize_mode of an open_clip preprocess cfg, with open_clip's defaults."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "mean": _rgb(cfg.get("mean") or OPENAI_DATASET_MEAN, "mean"),
        "std": _rgb(cfg.get("std") or OPENAI_DATASET_STD, "std"),
        "interpolation": cfg.get("interpolation") or "bicubic",
        "resize_mode": cfg.get("resize_mode") or "shortest",
    }


# ---------------------------------------------------------------------------------------------------------------
# open_clip -> transformers
# ---------------------------------------------------------------------------------------------------------------


def _openclip_preprocess_cfg(model: Any) -> dict[str, Any]:
    """open_clip's inference preprocessing for ``model`` as plain JSON data, with open_clip's defaults filled in."""
    import open_clip

    raw = dict(open_clip.get_model_preprocess_cfg(model) or {})
    size = raw.get("size", getattr(model.visual, "image_size", 224))
    size = list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)]
    return {"size": size, **_with_open_clip_defaults(raw)}


def _preprocess_cfg_of(obj: Any) -> dict[str, Any]:
    from torch import nn
    from transformers import CLIPModel

    if isinstance(obj, CLIPModel):
        cfg = getattr(obj.config, PREPROCESS_CONFIG_KEY, None)
        if cfg is None:
            size = obj.config.vision_config.image_size
            cfg = {"size": [size, size]}
        return dict(cfg)
    if isinstance(obj, nn.Module):
        from mmkd.interop.to_transformers import _check_model_class

        _check_model_class(obj)
        return _openclip_preprocess_cfg(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "__dataclass_fields__"):  # open_clip.transform.PreprocessCfg
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"expected an open_clip model, a converted CLIPModel or a preprocess cfg, got {type(obj).__name__}")


def image_processor_from_open_clip(model_or_preprocess_cfg: Any) -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` reproducing open_clip's inference transform.

    Accepts an open_clip model (its ``visual.preprocess_cfg``), an open_clip ``PreprocessCfg`` or dict, or a
    model converted by :func:`~mmkd.interop.to_transformers.open_clip_to_transformers` (its
    ``config.open_clip_preprocess_cfg``). Shortest-edge resize (bicubic unless bilinear), centre crop, 1/255
    rescale, open_clip's mean/std, RGB; ``resize_mode`` 'squash' is a plain square resize, 'longest' has no
    equivalent and raises ``ValueError``.

    The result is ``CLIPImageProcessor`` (what ``AutoImageProcessor`` resolves for "clip" in transformers v5,
    the torchvision backend). It resizes with torch's antialiased bicubic where open_clip uses PIL's:
    occasional one-level uint8 differences, at most ``1 / (255 * std)`` (~0.015) after normalisation. One
    systematic difference, shared by every transformers CLIP processor: the centre-crop offset is
    ``int((h - crop) / 2)`` in transformers and ``round((h - crop) / 2)`` in torchvision, so when the resized
    edge exceeds the crop by 3 (mod 4) pixels the crop sits one pixel further left / up. (RGB conversion comes
    before resizing here, after it in open_clip.)
    """
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    raw = _preprocess_cfg_of(model_or_preprocess_cfg)
    size = raw.get("size", 224)
    height, width = (size, size) if isinstance(size, (int, float)) else tuple(size)
    if height != width:
        raise ValueError(f"non-square image size {size} is not supported by CLIPModel / CLIPImageProcessor")
    size = int(height)
    cfg = _with_open_clip_defaults(raw)
    interpolation = _OPEN_CLIP_INTERPOLATIONS.get(cfg["interpolation"])
    if interpolation is None:
        raise ValueError(f"unsupported open_clip interpolation {cfg['interpolation']!r}")
    if cfg["resize_mode"] == "shortest":
        resize_kwargs: dict[str, Any] = {"size": {"shortest_edge": size}, "do_center_crop": True}
    elif cfg["resize_mode"] == "squash":
        resize_kwargs = {"size": {"height": size, "width": size}, "do_center_crop": False}
    else:  # 'longest': resize the longest edge then pad -- no CLIPImageProcessor equivalent
        raise ValueError(
            f"open_clip resize_mode {cfg['resize_mode']!r} is not supported by CLIPImageProcessor"
        )
    return CLIPImageProcessor(
        do_resize=True,
        resample=PILImageResampling(_RESAMPLE_CODES[interpolation]),
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=cfg["mean"],
        image_std=cfg["std"],
        do_convert_rgb=True,
        **resize_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# transformers -> open_clip
# ---------------------------------------------------------------------------------------------------------------


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return None if value is None else int(value)


def preprocess_cfg_from_image_processor(image_processor: Any, image_size: int | None = None) -> dict[str, Any]:
    """open_clip's inference ``preprocess_cfg`` equal to a transformers ``CLIPImageProcessor``.

    Returns ``{"size", "mean", "std", "interpolation", "resize_mode"}``: a shortest-edge resize to the crop
    size plus centre crop is open_clip's ``'shortest'``, a square ``{height, width}`` resize its ``'squash'``;
    ``do_normalize=False`` is mean 0 / std 1. Raises ``ValueError`` for what open_clip's transform cannot do
    (no resize, a crop smaller than the resize -- ImageNet-style crop_pct --, resampling other than bicubic /
    bilinear, no 1/255 rescale) and when the size differs from the model's ``image_size``.
    """
    ip = image_processor
    if not getattr(ip, "do_resize", True):
        raise ValueError("the image processor has do_resize=False; open_clip's transform always resizes")
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    crop_hw = None if crop is None else (_size_get(crop, "height"), _size_get(crop, "width"))
    size = ip.size
    shortest = _size_get(size, "shortest_edge")
    height, width = _size_get(size, "height"), _size_get(size, "width")
    if shortest is not None:
        if crop_hw != (shortest, shortest):
            raise ValueError(
                f"the image processor resizes the shortest edge to {shortest} and then "
                f"{'crops ' + str(crop_hw) if crop_hw else 'does not crop'}; open_clip's 'shortest' mode resizes "
                "to the crop size and centre-crops a square"
            )
        out_size, resize_mode = shortest, "shortest"
    elif height is not None and width is not None:
        if height != width or (crop_hw is not None and crop_hw != (height, width)):
            raise ValueError(
                f"the image processor resizes to {height}x{width}"
                f"{' and crops ' + str(crop_hw) if crop_hw else ''}; open_clip's 'squash' mode needs a square "
                "resize without a smaller crop"
            )
        out_size, resize_mode = height, "squash"
    else:
        raise ValueError(f"unsupported image processor size {size!r} (need shortest_edge or height/width)")
    if image_size is not None and out_size != image_size:
        raise ValueError(
            f"the image processor produces {out_size}x{out_size} images but the model's image_size is {image_size}"
        )
    resample = getattr(ip, "resample", 3)
    interpolation = _RESAMPLE_NAMES.get(int(resample) if resample is not None else 3)
    if interpolation not in _OPEN_CLIP_INTERPOLATIONS.values():
        raise ValueError(f"image processor resample={resample!r}: open_clip resizes bicubic or bilinear only")
    if getattr(ip, "do_rescale", True) and not math.isclose(float(ip.rescale_factor), 1 / 255, rel_tol=1e-9):
        raise ValueError(f"image processor rescale_factor {ip.rescale_factor}: open_clip scales pixels by 1/255")
    if not getattr(ip, "do_rescale", True):
        raise ValueError("the image processor has do_rescale=False; open_clip scales pixels by 1/255")
    if getattr(ip, "do_normalize", True):
        mean = _rgb(ip.image_mean, "image processor image_mean")
        std = _rgb(ip.image_std, "image processor image_std")
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return {"size": out_size, "mean": mean, "std": std, "interpolation": interpolation, "resize_mode": resize_mode}


def _default_preprocess_cfg(model: Any) -> dict[str, Any]:
    """The preprocessing recorded in ``config.open_clip_preprocess_cfg``, else open_clip's defaults."""
    image_size = int(model.config.vision_config.image_size)
    recorded = getattr(model.config, PREPROCESS_CONFIG_KEY, None)
    if recorded:
        size = recorded.get("size", image_size)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        if size != image_size:
            raise ValueError(f"config.{PREPROCESS_CONFIG_KEY} size {size} differs from the model's {image_size}")
        return {"size": size, **_with_open_clip_defaults(recorded)}
    logger.warning(
        "no image processor given or saved beside the model: exporting open_clip's default preprocessing "
        "(OpenAI mean/std, bicubic shortest-edge resize + centre crop to %d)",
        image_size,
    )
    return {"size": image_size, **_with_open_clip_defaults({})}


# ---------------------------------------------------------------------------------------------------------------
# comparable signatures
# ---------------------------------------------------------------------------------------------------------------


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
