"""Student models: the half-depth CLIP built from its teacher, and the ResNet + MiniLM matcher."""

from mmkd.students.clip import STRATEGIES, StudentInit, build_student, count_parameters, select_layers
from mmkd.students.resnet_minilm import ResNetMiniLMConfig, ResNetMiniLMMatcher, load_text_tokenizer

__all__ = [
    "STRATEGIES",
    "ResNetMiniLMConfig",
    "ResNetMiniLMMatcher",
    "StudentInit",
    "build_student",
    "count_parameters",
    "load_text_tokenizer",
    "select_layers",
]
