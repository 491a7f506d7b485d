"""Frozen teachers and the one function that loads them, whatever library they come from.

:data:`BACKENDS` is the table of backends: each entry says which specs it recognises (``claims``) and how it
loads one. ``load_teacher(spec)`` asks them in order (``backend="auto"``) or uses the one named:

    >>> teacher = load_teacher("ViT-B-32", pretrained="laion2b_s34b_b79k")            # open_clip
    >>> teacher = load_teacher("openai/clip-vit-base-patch32")                        # transformers hub id
    >>> teacher = load_teacher("recipes/configs/tiny_openclip_vit.json")              # open_clip custom config
    >>> teacher = load_teacher("out/match/teacher")                                   # a fine-tuned CLIP matcher

A new backend is one more entry: ``BACKENDS["mine"] = TeacherBackend(claims=..., load=...)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmkd.checks import ConfigError
from mmkd.teachers import matcher, openclip, transformers_clip
from mmkd.teachers.base import CLIPTeacher, FrozenTeacher, TeacherOutput
from mmkd.teachers.matcher import MatcherTeacher
from mmkd.teachers.openclip import OpenCLIPTeacher
from mmkd.teachers.transformers_clip import TransformersCLIPTeacher

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "CLIPTeacher",
    "FrozenTeacher",
    "MatcherTeacher",
    "OpenCLIPTeacher",
    "TeacherBackend",
    "TeacherOutput",
    "TransformersCLIPTeacher",
    "check_teacher_spec",
    "load_teacher",
    "load_transformers_clip",
    "resolve_backend",
    "teacher_shapes",
]


@dataclass(frozen=True)
class TeacherBackend:
    """How one library's models become teachers: ``claims(spec)`` says whether ``auto`` picks this backend,
    ``load(spec, pretrained, cache_dir)`` returns the frozen teacher."""

    claims: Callable[[str], bool]
    load: Callable[[str, str | None, str | None], FrozenTeacher]


# In the order "auto" asks them: a matcher folder and open_clip's own specs first; transformers takes any other
# folder holding a CLIP config.json and every non-folder spec (a hub id).
BACKENDS: dict[str, TeacherBackend] = {
    "clip_matcher": TeacherBackend(claims=matcher.claims, load=matcher.load),
    "open_clip": TeacherBackend(claims=openclip.claims, load=openclip.load),
    "transformers": TeacherBackend(claims=transformers_clip.claims, load=transformers_clip.load),
}
BACKEND_CHOICES = ("auto", "open_clip", "transformers")  # what a CLIP distillation's teacher_backend may say


def resolve_backend(name_or_path: str, backend: str = "auto") -> str:
    """The name of the backend that loads ``name_or_path`` (see :data:`BACKENDS` for the order)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"Unknown teacher backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}.")
        return backend
    for name, entry in BACKENDS.items():
        if entry.claims(name_or_path):
            return name
    if Path(name_or_path).is_dir():
        raise ValueError(
            f"Teacher directory {name_or_path!r} holds neither a transformers CLIP config.json (model_type 'clip') "
            "nor an open_clip_config.json."
        )
    raise ValueError(f"no teacher backend recognises {name_or_path!r}")


def load_teacher(
    name_or_path: str,
    pretrained: str | None = None,
    backend: str = "auto",
    cache_dir: str | None = None,
    dtype: torch.dtype | None = None,
) -> FrozenTeacher:
    """Load a frozen teacher.

    Args:
        name_or_path: open_clip model name (``ViT-B-32``), ``hf-hub:org/repo``, ``local-dir:/path``, a path to an
            open_clip model config ``*.json``; a transformers hub id / local directory of a ``CLIPModel``; or a
            CLIP matcher folder written by ``recipes/match_student.py``.
        pretrained: open_clip only: a pretrained tag (``laion2b_s34b_b79k``, ``openai``) or a local checkpoint path.
            ``None`` gives random weights (useful for tests and benchmarks).
        backend: ``auto`` (default) or a key of :data:`BACKENDS`.
        cache_dir: where hub downloads go.
        dtype: optional dtype to cast the teacher to (accelerate casts it anyway under mixed precision).
    """
    teacher = BACKENDS[resolve_backend(name_or_path, backend)].load(name_or_path, pretrained, cache_dir)
    if dtype is not None:
        teacher.to(dtype)
    return teacher


def load_transformers_clip(name_or_path: str, pretrained: str | None = None, backend: str = "auto"):
    """``(CLIPModel, CLIPProcessor, name)`` of any CLIP spec: its exact, trainable transformers twin."""
    teacher = load_teacher(name_or_path, pretrained=pretrained, backend=backend)
    if not isinstance(teacher, CLIPTeacher):
        raise ValueError(f"{name_or_path!r} is a {teacher.backend} model, not a CLIP")
    return teacher.to_transformers(), teacher.transformers_processor(), teacher.name


# -- checks before anything is loaded --------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~", "local-dir:")) or spec.endswith((".json", *_WEIGHT_SUFFIXES)) or (
        os.sep in spec and spec.count("/") != 1
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def check_teacher_spec(name_or_path: str | None, pretrained: str | None = None, backend: str = "auto",
                       option: str = "teacher_name_or_path") -> None:
    """Refuse a teacher spec that cannot load, before any model is: a missing local path (not reported as a bad hub
    id), an open_clip name that does not exist (with the close matches), an unknown pretrained tag, a hub id while
    the Hub is offline and the id is not in the local cache. Raises :class:`~mmkd.checks.ConfigError`."""
    if name_or_path is None or not str(name_or_path).strip():
        raise ConfigError(f"{option}=None: required (an open_clip name, a CLIPModel folder or hub id, a *.json config)")
    spec = str(name_or_path)
    local = spec.removeprefix("local-dir:")
    if _looks_like_path(spec) or Path(local).exists():
        if not Path(local).expanduser().exists():
            raise ConfigError(f"{option}={spec}: no such file or directory")
        if Path(local).is_dir():
            try:
                resolve_backend(local if not spec.startswith("local-dir:") else spec, backend)
            except ValueError as err:
                raise ConfigError(f"{option}={spec}: {err}") from None
    elif spec.startswith("hf-hub:") or spec.count("/") == 1:
        repo = spec.removeprefix("hf-hub:")
        if _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            filename = "open_clip_config.json" if spec.startswith("hf-hub:") else "config.json"
            if not isinstance(try_to_load_from_cache(repo, filename), str):
                raise ConfigError(f"{option}={spec}: not a local path, and {repo!r} is not in the local Hub cache "
                                  "while the Hub is offline (HF_HUB_OFFLINE=1)")
    else:
        import difflib

        import open_clip

        names = open_clip.list_models()
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{option}={spec}: not an open_clip model name, a local path or an org/name hub id{hint}")
        if pretrained is not None and not _looks_like_path(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(spec)
            if pretrained.lower().replace("-", "_") not in tags:  # open_clip's own tag normalisation
                raise ConfigError(f"teacher_pretrained={pretrained}: not a pretrained tag of {spec} "
                                  f"(tags: {', '.join(tags) or 'none'})")
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).expanduser().is_file():
        raise ConfigError(f"teacher_pretrained={pretrained}: no such file")


def teacher_shapes(name_or_path: str) -> dict | None:
    """The teacher's ``{"vision": TowerShape, "text": TowerShape}`` (layers, width, heads, MLP width) from its config
    alone, without its weights; ``None`` when only loading would tell (a hub id)."""
    from mmkd.students.width import TowerShape

    spec = str(name_or_path)
    local = Path(spec.removeprefix("local-dir:"))
    try:
        if local.is_dir() and (local / "config.json").is_file():
            cfg = json.loads((local / "config.json").read_text())
            if cfg.get("model_type") != "clip":
                return None
            from transformers import CLIPConfig

            clip = CLIPConfig.from_dict(cfg)  # transformers' defaults for keys the file leaves out
            return {"vision": TowerShape.of(clip.vision_config), "text": TowerShape.of(clip.text_config)}
        if local.is_dir() and (local / "open_clip_config.json").is_file():
            cfg = json.loads((local / "open_clip_config.json").read_text())["model_cfg"]
        elif spec.endswith(".json") and local.is_file():
            cfg = json.loads(local.read_text())
        elif not _looks_like_path(spec) and "/" not in spec:
            import open_clip

            cfg = open_clip.get_model_config(spec)
            if cfg is None:
                return None
        else:
            return None
        # open_clip's defaults (CLIPVisionCfg / CLIPTextCfg) for keys a config leaves out
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        if not isinstance(v.get("layers", 12), int):
            return None  # a ResNet tower: no transformer shape
        vw, tw = int(v.get("width", 768)), int(t.get("width", 512))
        return {
            "vision": TowerShape(int(v.get("layers", 12)), vw, vw // int(v.get("head_width", 64)),
                                 int(vw * float(v.get("mlp_ratio", 4.0)))),
            "text": TowerShape(int(t.get("layers", 12)), tw, int(t.get("heads", 8)), int(tw * float(t.get("mlp_ratio", 4.0)))),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None
