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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

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
    "load_teacher",
    "load_transformers_clip",
    "resolve_backend",
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
