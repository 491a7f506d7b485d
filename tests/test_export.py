"""Tests for mmkd.interop.to_open_clip: a transformers CLIPModel (an mmkd student) exported as an open_clip checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

from mmkd import cli
from mmkd.interop.to_open_clip import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    clip_model_to_open_clip,
    export_open_clip,
    preprocess_cfg_from_image_processor,
)
from mmkd.interop.to_transformers import open_clip_to_transformers, open_clip_tokenizer_to_transformers
from mmkd.students import build_student
from tests.conftest import TINY_OPEN_CLIP_CONFIG, tiny_clip_config


def main(argv: list[str]) -> int:
    """``mmkd export ...`` in-process: the command's exit status."""
    return cli.main(["export", *argv])

ATOL = 1e-5
TEXTS = [
    "a photo of a cat.",
    "A Photo Of A DOG!",
    "The 3 little pigs ate 42 apples in 2024.",
    "x",
    "",
    "a very long caption that keeps going " * 20,  # truncated to the context length
]


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Randomise every parameter so zero biases / unit LayerNorms cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def _load_registered(paths: dict[str, Path], name: str):
    """The documented route: register <name>.json, create the model from the weights file."""
    open_clip.add_model_config(paths["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(paths["weights"]))
    return model.eval(), preprocess


def _assert_same_embeddings(hf: CLIPModel, oc: torch.nn.Module, oc_tokenizer) -> None:
    hf.eval()
    size = hf.config.vision_config.image_size
    hf_tok = open_clip_tokenizer_to_transformers(hf.config.text_config.max_position_embeddings)
    enc = hf_tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pixels = _images(size=size)
        hf_img = hf.get_image_features(pixel_values=pixels).pooler_output
        oc_img = oc.encode_image(pixels)
        hf_txt = hf.get_text_features(**enc).pooler_output
        oc_txt = oc.encode_text(oc_tokenizer(TEXTS))
        # the transformers ids fed to open_clip too, padded with 0 up to its fixed context length
        same_ids = torch.nn.functional.pad(enc["input_ids"], (0, oc.context_length - enc["input_ids"].shape[1]))
        oc_same = oc.encode_text(same_ids)
    assert hf_img.shape == oc_img.shape and hf_txt.shape == oc_txt.shape
    torch.testing.assert_close(oc_img, hf_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(oc_txt, hf_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(oc_same, hf_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(oc.logit_scale.detach(), hf.logit_scale.detach(), atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny_student_dir(tiny_hf_clip_dir, tmp_path_factory) -> Path:
    """The conftest tiny CLIPModel with every parameter perturbed, saved with its processor."""
    model = CLIPModel.from_pretrained(tiny_hf_clip_dir)
    _perturb_(model, seed=1)
    path = tmp_path_factory.mktemp("tiny-student")
    model.save_pretrained(path)
    CLIPProcessor.from_pretrained(tiny_hf_clip_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def half_depth_student(open_clip_teacher, tmp_path_factory) -> tuple[Path, CLIPModel]:
    """open_clip teacher -> CLIPModel -> half-depth student (perturbed), saved with the teacher's processor."""
    teacher_hf = open_clip_teacher.to_transformers()
    _perturb_(teacher_hf, seed=2)
    student, _ = build_student(teacher_hf)
    path = tmp_path_factory.mktemp("half-depth-student")
    student.save_pretrained(path)
    open_clip_teacher.transformers_processor().save_pretrained(path)
    return path, student.eval()


# -------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_round_trip_tiny_config(tmp_path, quick_gelu):
    torch.manual_seed(0)
    hf = CLIPModel(tiny_clip_config(quick_gelu=quick_gelu)).eval()
    _perturb_(hf, seed=3)
    name = f"mmkd-test-tiny-{'quickgelu' if quick_gelu else 'gelu'}"
    paths = export_open_clip(hf, tmp_path, model_name=name)
    assert set(paths) == {"config", "model_config", "weights"}
    assert paths["config"].name == CONFIG_NAME and paths["weights"].name == WEIGHTS_NAME
    assert paths["model_config"].name == f"{name}.json"
    oc, _ = _load_registered(paths, name)
    assert isinstance(oc, open_clip.CLIP)
    mlp_act = oc.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(mlp_act, open_clip.transformer.QuickGELU) == quick_gelu
    _assert_same_embeddings(hf, oc, open_clip.get_tokenizer(name))


def test_round_trip_half_depth_student(half_depth_student, tmp_path):
    path, student = half_depth_student
    paths = export_open_clip(path, tmp_path / "oc", model_name="mmkd-test-half-depth")
    oc, _ = _load_registered(paths, "mmkd-test-half-depth")
    assert len(oc.visual.transformer.resblocks) == student.config.vision_config.num_hidden_layers == 2
    assert len(oc.transformer.resblocks) == student.config.text_config.num_hidden_layers == 2
    _assert_same_embeddings(student, oc, open_clip.get_tokenizer("mmkd-test-half-depth"))
    # the one-call route open_clip documents for a folder: config, weights and preprocessing together
    oc_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    _assert_same_embeddings(student, oc_dir.eval(), open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}"))


def test_full_round_trip_gives_back_the_open_clip_model(open_clip_teacher):
    """open_clip -> CLIPModel (mmkd.interop.to_transformers) -> open_clip (mmkd.interop.to_open_clip): the same config and the same tensors."""
    original = open_clip_teacher.model
    cfg, sd = clip_model_to_open_clip(open_clip_to_transformers(original))
    expected = json.loads(TINY_OPEN_CLIP_CONFIG.read_text())
    for key in ("embed_dim",):
        assert cfg[key] == expected[key]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in expected[tower].items():
            assert cfg[tower][key] == value, (tower, key)
    assert cfg["quick_gelu"] is False
    ref = original.state_dict()
    assert set(sd) == set(ref)
    for key, value in ref.items():
        assert torch.equal(sd[key], value.detach()), key


def test_mapped_extras_round_trip(tmp_path):
    """LayerNorm eps, tanh GELU and a non-standard eos id become norm_kwargs, act_kwargs and eos pooling."""
    cfg = tiny_clip_config()
    for sub in (cfg.vision_config, cfg.text_config):
        sub.layer_norm_eps = 1e-6
        sub.hidden_act = "gelu_pytorch_tanh"
        sub.intermediate_size = 48  # mlp_ratio 1.5
    cfg.text_config.eos_token_id = 49406  # pool at the first <|startoftext|> id: exotic, but expressible
    torch.manual_seed(0)
    hf = CLIPModel(cfg).eval()
    _perturb_(hf, seed=4)
    oc_cfg, _ = clip_model_to_open_clip(hf)
    assert oc_cfg["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6} == oc_cfg["text_cfg"]["norm_kwargs"]
    assert oc_cfg["vision_cfg"]["act_kwargs"] == {"approximate": "tanh"}
    assert oc_cfg["text_cfg"]["mlp_ratio"] == 1.5
    assert oc_cfg["text_cfg"]["pool_type"] == "eos" and oc_cfg["text_cfg"]["eos_id"] == 49406
    paths = export_open_clip(hf, tmp_path, model_name="mmkd-test-extras")
    oc, _ = _load_registered(paths, "mmkd-test-extras")
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, :6] = torch.tensor([[320, 1125, 539, 320, 2368, 49406], [49406, 1125, 539, 49407, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            oc.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output, atol=ATOL, rtol=0
        )
        px = _images()
        torch.testing.assert_close(
            oc.encode_image(px), hf.get_image_features(pixel_values=px).pooler_output, atol=ATOL, rtol=0
        )


# ------------------------------------------------------------------------------------------- config and files


def test_config_files(tiny_student_dir, tmp_path):
    paths = export_open_clip(tiny_student_dir, tmp_path, model_name="mmkd-test-files")
    hub = json.loads(paths["config"].read_text())
    assert set(hub) == {"model_cfg", "preprocess_cfg"}
    bare = json.loads(paths["model_config"].read_text())
    assert bare == hub["model_cfg"]
    assert bare == {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4,
                     "mlp_ratio": 2.0},
    }
    ip = CLIPImageProcessor.from_pretrained(tiny_student_dir)
    assert hub["preprocess_cfg"] == {
        "mean": list(ip.image_mean),
        "std": list(ip.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    # add_model_config also takes the folder: open_clip_config.json (no top-level embed_dim) is skipped
    open_clip.add_model_config(tmp_path)
    assert "mmkd-test-files" in open_clip.list_models()
    assert "open_clip_config" not in open_clip.list_models()
    from safetensors.torch import load_file

    weights = load_file(str(paths["weights"]))
    assert weights["visual.proj"].shape == (32, 16) and weights["text_projection"].shape == (32, 16)
    assert weights["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)


def test_preprocessing_matches_the_image_processor(half_depth_student, tmp_path):
    path, _ = half_depth_student
    export_open_clip(path, tmp_path, model_name="mmkd-test-preprocess")
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    ip = CLIPImageProcessor.from_pretrained(path)
    steps = {type(t).__name__: t for t in transform.transforms}
    assert steps["Resize"].size == ip.size["shortest_edge"] == 32
    assert tuple(steps["CenterCrop"].size) == (ip.crop_size["height"], ip.crop_size["width"]) == (32, 32)
    assert steps["Resize"].interpolation.value == "bicubic" and ip.resample == 3
    assert list(steps["Normalize"].mean) == list(ip.image_mean)
    assert list(steps["Normalize"].std) == list(ip.image_std)
    # an image already at the model's size is only rescaled and normalised: both give the same pixels
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    ours = transform(image)
    theirs = ip(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # a larger image: resize + crop agree up to uint8 rounding of the two bicubic implementations
    big = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1))
    diff = (transform(big) - ip(images=big, return_tensors="pt")["pixel_values"][0]).abs()
    assert diff.mean() < 0.02


def test_squash_and_unnormalised_preprocessing():
    ip = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, do_normalize=False, resample=2)
    assert preprocess_cfg_from_image_processor(ip, 32) == {
        "size": 32, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
        "resize_mode": "squash",
    }


# ------------------------------------------------------------------------------------------------- refusals


def _with(**changes) -> CLIPModel:
    cfg = tiny_clip_config()
    for key, value in changes.items():
        tower, attr = key.split("__")
        setattr(getattr(cfg, f"{tower}_config"), attr, value)
    return CLIPModel(cfg)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vision__hidden_act": "relu", "text__hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"text__hidden_act": "quick_gelu"}, "different activations"),
        ({"text__vocab_size": 1000}, "vocabulary of 1000 tokens"),
        ({"vision__num_channels": 1}, "1 image channels"),
    ],
)
def test_refuses_what_open_clip_cannot_express(tmp_path, changes, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        export_open_clip(_with(**changes), out)
    assert not out.exists()  # refused before anything was written


def test_refuses_projection_bias(tmp_path):
    model = CLIPModel(tiny_clip_config())
    old = model.visual_projection
    model.visual_projection = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with pytest.raises(ValueError, match=r"visual_projection\.bias"):
        clip_model_to_open_clip(model)
    with pytest.raises(ValueError, match=r"visual_projection\.bias"):
        export_open_clip(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_unexpressible_preprocessing(tiny_student_dir, tmp_path):
    crop_pct = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="shortest edge to 40"):
        export_open_clip(tiny_student_dir, tmp_path / "out", image_processor=crop_pct)
    wrong_size = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="image_size is 32"):
        export_open_clip(tiny_student_dir, tmp_path / "out", image_processor=wrong_size)
    nearest = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=0)
    with pytest.raises(ValueError, match="bicubic or bilinear"):
        export_open_clip(tiny_student_dir, tmp_path / "out", image_processor=nearest)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ViT-B-32", "a/b", "", "open_clip_config", "-x"])
def test_refuses_bad_model_names(tiny_student_dir, tmp_path, name):
    with pytest.raises(ValueError, match="model name"):
        export_open_clip(tiny_student_dir, tmp_path / "out", model_name=name)


def test_refuses_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_open_clip(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_open_clip(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert'"):
        export_open_clip(tmp_path / "bert", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_files(tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main([str(tiny_student_dir), str(out), "--model-name", "mmkd-test-cli"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, "mmkd-test-cli.json", WEIGHTS_NAME])
    printed = capsys.readouterr().out
    assert str(out / WEIGHTS_NAME) in printed and "local-dir:" in printed
    oc, _ = _load_registered(
        {"model_config": out / "mmkd-test-cli.json", "weights": out / WEIGHTS_NAME}, "mmkd-test-cli"
    )
    _assert_same_embeddings(CLIPModel.from_pretrained(tiny_student_dir), oc, open_clip.get_tokenizer("mmkd-test-cli"))


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd export: error:") and "\n" not in err and "nope" in err
    assert not (tmp_path / "out").exists()
