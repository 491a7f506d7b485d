"""Teacher assistants: distil teacher → assistant → … → student, each stage the next stage's teacher.

Mirzadeh et al. (2020) bridge a large teacher-student gap with intermediate "teacher assistants"; TinyCLIP compresses
in stages the same way. A chain is the assistants' shapes, largest first, as ``--chain`` takes them: ``4,2`` (each
assistant ``4`` then ``2`` layers in both towers, the width of its teacher) or ``4x144,2x96`` (depth x width). The
final student is the recipe's own ``student_*`` options. Every stage must be smaller than the one before it (fewer
layers or a narrower width, neither larger), checked against the teacher before anything is trained.

The recipe (``recipes/clip_student.py --chain``) trains the stages in order into ``<output_dir>/assistants/<i>-<shape>``
and the student into ``<output_dir>``; a stage whose folder holds a finished run of the same arguments is reused, an
interrupted one resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmkd.checks import ConfigError

__all__ = ["CHAIN_RECORD", "ChainStage", "check_chain", "parse_chain"]

CHAIN_RECORD = "chain_stage.json"  # written last in a stage's folder: the stage finished
_STAGE = re.compile(r"(\d+)(?:x(\d+))?")


@dataclass(frozen=True)
class ChainStage:
    """One model of the chain: its depth (both towers) and, if narrower than its teacher, its width (both towers)."""

    layers: int
    width: int | None = None

    @property
    def label(self) -> str:
        return f"{self.layers}L" + (f"x{self.width}" if self.width else "")


def parse_chain(spec: str) -> list[ChainStage]:
    """``"4,2"`` / ``"4x144,2x96"`` -> the assistants, largest first; a :class:`ConfigError` naming ``chain``."""
    stages = []
    for item in (part.strip() for part in str(spec).split(",")):
        match = _STAGE.fullmatch(item)
        if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
            raise ConfigError(f"chain={spec}: {item!r} is not a stage; write depths (4,2) or depth x width "
                              "(4x144,2x96), each at least 1")
        stages.append(ChainStage(int(match[1]), int(match[2]) if match[2] else None))
    return stages


def check_chain(spec: str, stages: list[ChainStage], teacher: dict[str, tuple[int, int]],
                student: dict[str, tuple[int, int]]) -> None:
    """Each model smaller than the one before it: teacher ``{tower: (layers, width)}``, then the stages, then the
    ``student``'s ``{tower: (layers, width)}`` (a width of ``None``: its teacher's). Raises :class:`ConfigError` naming ``chain``."""
    previous = {tower: ("the teacher", shape) for tower, shape in teacher.items()}
    models = [(f"assistant {s.label}", {tower: (s.layers, s.width) for tower in teacher}) for s in stages]
    for name, shapes in [*models, ("the student", student)]:
        for tower, (layers, width) in shapes.items():
            before_name, (before_layers, before_width) = previous[tower]
            width = width if width is not None else before_width
            if layers > before_layers or width > before_width or (layers, width) == (before_layers, before_width):
                raise ConfigError(
                    f"chain={spec}: {name} ({tower}: {layers} layers, width {width}) is not smaller than "
                    f"{before_name} ({before_layers} layers, width {before_width}); each model of a chain has fewer "
                    "layers or a narrower width than its teacher")
            previous[tower] = (name, (layers, width))
