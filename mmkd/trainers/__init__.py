"""Trainers: ``Trainer`` subclasses for each kind of distillation, on one skeleton (:mod:`mmkd.trainers.base`)."""

from mmkd.trainers.base import DistillationConfig, DistillationTrainer, LossTerm
from mmkd.trainers.clip_distillation import CLIP_LOSS_TERMS, CLIPDistillationConfig, CLIPDistillationTrainer
from mmkd.trainers.match_distillation import (
    MATCH_LOSS_TERMS,
    MatchDistillationConfig,
    MatchDistillationTrainer,
)

__all__ = [
    "CLIP_LOSS_TERMS",
    "MATCH_LOSS_TERMS",
    "CLIPDistillationConfig",
    "CLIPDistillationTrainer",
    "DistillationConfig",
    "DistillationTrainer",
    "LossTerm",
    "MatchDistillationConfig",
    "MatchDistillationTrainer",
]
