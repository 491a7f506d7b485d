"""Shared fixtures: tiny random CLIP teachers for both backends, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_OPEN_CLIP_CONFIG = REPO / "recipes" / "configs" / "tiny_openclip_vit.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` (a flat script, not a package module) as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_clip_config(layers: int = 4, quick_gelu: bool = False):
    """A transformers CLIPConfig as small as transformers' own tests use, with CLIP's real vocabulary size."""
    from transformers import CLIPConfig

    act = "quick_gelu" if quick_gelu else "gelu"
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=16,
    )


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    """A random 4+4-layer transformers CLIPModel with a processor, saved like a hub repository."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mmkd.interop.to_transformers import open_clip_tokenizer_to_transformers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-hf-clip")
    model = CLIPModel(tiny_clip_config())
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=open_clip_tokenizer_to_transformers()).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="session")
def open_clip_teacher():
    from mmkd.teachers import load_teacher

    torch.manual_seed(0)
    return load_teacher(str(TINY_OPEN_CLIP_CONFIG))


@pytest.fixture(scope="session")
def hf_teacher(tiny_hf_clip_dir):
    from mmkd.teachers import load_teacher

    return load_teacher(str(tiny_hf_clip_dir))


@pytest.fixture(params=["open_clip", "transformers"])
def teacher(request, open_clip_teacher, hf_teacher):
    return open_clip_teacher if request.param == "open_clip" else hf_teacher


@pytest.fixture(scope="session")
def shapes():
    from mmkd.data import shapes_dataset

    return shapes_dataset(64, image_size=32, seed=0)
