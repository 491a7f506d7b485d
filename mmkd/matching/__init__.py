"""Binary image-text match distillation (research 000): a CLIP matcher teacher, a ResNet + MiniLM student."""

from mmkd.matching.models import (
    CLIPMatcher,
    CLIPMatcherConfig,
    MatcherOutput,
    ResNetMiniLMConfig,
    ResNetMiniLMMatcher,
    load_text_tokenizer,
)

__all__ = [
    "CLIPMatcher",
    "CLIPMatcherConfig",
    "MatcherOutput",
    "ResNetMiniLMConfig",
    "ResNetMiniLMMatcher",
    "load_text_tokenizer",
]
