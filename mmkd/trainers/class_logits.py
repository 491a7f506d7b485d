"""The zero-shot class logits' plumbing for the CLIP trainer (the maths is :mod:`mmkd.losses.logits`): the prompts
of every class, the teacher's class embeddings -- its zero-shot classifier, built once by
:func:`mmkd.eval.zeroshot.zero_shot_classifier` since it is frozen -- and the check of the prompt templates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ClassTargets", "check_templates", "class_prompts", "teacher_class_targets"]


@dataclass(frozen=True)
class ClassTargets:
    """The teacher's side of the zero-shot class logits: its ``(C, E)`` class embeddings and its logit scale."""

    embeddings: torch.Tensor
    logit_scale: torch.Tensor


def class_prompts(class_names: list[str], templates: list[str]) -> list[str]:
    """Every ``(class, template)`` prompt, class-major (what :func:`~mmkd.losses.logits.class_embeddings` splits)."""
    return [t.format(c=c) for c in class_names for t in templates]


def teacher_class_targets(teacher, class_names: list[str], templates: list[str]) -> ClassTargets:
    """The teacher's class embeddings from its own text tower and tokenizer: its zero-shot classifier."""
    from mmkd.eval.zeroshot import zero_shot_classifier

    classifier = zero_shot_classifier(teacher, class_names, templates)  # (E, C), normalised columns
    return ClassTargets(classifier.T.contiguous().cpu(), teacher.logit_scale.detach().cpu())


def check_templates(templates) -> str | None:
    """``class_templates``: at least one, each with ``{c}`` and no other braces."""
    if not templates:
        return "give at least one template"
    for template in templates:
        if "{c}" not in template:
            return f"{template!r} has no {{c}} placeholder for the class name"
        try:
            template.format(c="class")
        except (KeyError, IndexError, ValueError):
            return f"{template!r}: only {{c}} may be in braces (write {{{{ and }}}} for literal braces)"
    return None
