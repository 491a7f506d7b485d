"""Proof of additivity: a loss term, a dataset source and a layer-selection strategy defined here, outside the mmkd
package, each added with one table entry, train a student through the real recipe -- no mmkd file is edited.

* the loss term: matching the norms of the student's and the teacher's image embeddings;
* the data source: generated images of vertical or horizontal stripes, captioned;
* the strategy: keep the teacher's *last* layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import set_seed

from mmkd.data.sources import DataArguments, DatasetSource
from mmkd.losses import LossInputs
from mmkd.trainers import CLIPDistillationConfig, LossTerm
from tests.conftest import REPO, load_recipe


class EmbeddingNormLoss(nn.Module):
    """``weight · mean((|s_i| − |t_i|)²)`` over the image embeddings: a term mmkd does not have."""

    terms = ("image_norm",)
    citation = "@misc{test_norm, title = {A made-up norm-matching term}}"

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        s, t = inputs.student_image.float(), inputs.teacher_image.float()
        return {"image_norm": self.weight * (s.norm(dim=-1) - t.norm(dim=-1)).pow(2).mean()}


def last_layers(teacher_depth: int, depth: int) -> list[int]:
    return list(range(teacher_depth - depth, teacher_depth))


@dataclass
class NormConfig(CLIPDistillationConfig):
    norm_weight: float = field(default=0.0, metadata={"help": "Weight of the embedding-norm term."})
    loss_terms = {
        **CLIPDistillationConfig.loss_terms,
        "norm": LossTerm(
            weight="norm_weight",
            build=lambda a: EmbeddingNormLoss(a.norm_weight),
            needs=frozenset({"student_image", "teacher_image"}),
            description="embedding-norm matching, image tower (weight {norm_weight})",
        ),
    }
    layer_strategies = {**CLIPDistillationConfig.layer_strategies, "last": last_layers}


def stripes(data_args) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    n = data_args.max_train_samples or 24
    images, texts = [], []
    for i in range(n):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        colour = rng.integers(60, 255, size=3, dtype=np.uint8)
        if i % 2:
            pixels[:, ::4] = colour
        else:
            pixels[::4, :] = colour
        images.append(Image.fromarray(pixels))
        texts.append("vertical stripes" if i % 2 else "horizontal stripes")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)


@dataclass
class StripesData(DataArguments):
    sources = {**DataArguments.sources, "stripes": DatasetSource(stripes, "{max_train_samples} generated stripes")}


def test_norm_term_is_derived_like_a_built_in_one(tmp_path):
    off = dict(triplet_weight=0.0, image_distill_weight=0.0, text_distill_weight=0.0, contrastive_weight=0.0)
    cfg = NormConfig(output_dir=str(tmp_path), norm_weight=1.0, use_cpu=True, **off)
    assert list(cfg.active_terms()) == ["norm"] and cfg.needs_teacher
    assert cfg.ddp_find_unused_parameters is True  # the norm term alone trains the image tower only
    with pytest.raises(ValueError, match="norm_weight=-1.0: must be >= 0"):
        NormConfig(output_dir=str(tmp_path), norm_weight=-1.0, use_cpu=True)
    with pytest.raises(ValueError, match="student_init='middle'"):
        NormConfig(output_dir=str(tmp_path), student_init="middle", use_cpu=True)


def test_a_new_term_source_and_strategy_train_through_the_recipe(tmp_path):
    recipe = load_recipe("clip_student")
    out = tmp_path / "student"
    teacher_spec = str(REPO / "recipes/configs/tiny_openclip_vit.json")
    argv = ["--teacher_name_or_path", teacher_spec, "--dataset_name", "stripes", "--max_train_samples", "16",
            "--student_init", "last", "--student_vision_layers", "2", "--student_text_layers", "2",
            "--norm_weight", "1.0", "--triplet_weight", "1.0", "--image_distill_weight", "0",
            "--text_distill_weight", "0", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--seed", "0"]
    summary = recipe.main(argv, config_class=NormConfig, data_class=StripesData)

    assert summary["global_step"] == 2
    # the term: logged on its own, on the card's rows with its own description
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    norm = [h["loss_image_norm"] for h in history if "loss_image_norm" in h]
    assert len(norm) == 2 and all(v > 0 for v in norm)
    rows = {r["name"]: r for r in summary["losses"]}
    assert set(rows) == {"triplet", "norm"}
    assert rows["norm"]["terms"] == ["image_norm"] and rows["norm"]["source"].endswith("(weight 1.0)")
    # the source: its card line, and the run saw its rows
    assert summary["data_description"] == "16 generated stripes"
    # the strategy: the student copied the teacher's last two blocks of each tower
    config = json.loads((out / "config.json").read_text())
    assert config["distillation_init"]["strategy"] == "last"
    assert config["distillation_init"]["vision_layers"] == [2, 3] == config["distillation_init"]["text_layers"]
    set_seed(0)  # as the recipe did: the same random teacher, so `fresh` is the student before training
    teacher, fresh, _, init, _ = recipe.build_models(
        NormConfig(output_dir=str(tmp_path / "x"), student_init="last", student_vision_layers=2,
                   student_text_layers=2, teacher_name_or_path=teacher_spec, use_cpu=True)
    )
    assert init.vision_layers == [2, 3]
    teacher_sd = teacher.to_transformers().state_dict()
    kept = ("vision_model.encoder.layers.1.", "text_model.encoder.layers.0.")
    block = [k for k in fresh.state_dict() if k.startswith(kept)]
    for key in block:
        source = key.replace("layers.1.", "layers.3.").replace("layers.0.", "layers.2.")
        assert torch.equal(fresh.state_dict()[key], teacher_sd[source].float()), key
    trained = load_file(out / "model.safetensors")
    assert not torch.equal(trained["vision_model.encoder.layers.1.mlp.fc1.weight"],
                           fresh.state_dict()["vision_model.encoder.layers.1.mlp.fc1.weight"])  # it trained
