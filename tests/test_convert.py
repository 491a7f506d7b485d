"""Tests for mmkd.interop.to_transformers: exact open_clip -> transformers CLIP conversion (model, tokenizer, image processor)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from mmkd.interop.to_transformers import (
    OPENCLIP_EOS_TOKEN_ID,
    image_processor_from_open_clip,
    open_clip_processor,
    open_clip_to_transformers,
    open_clip_tokenizer_to_transformers,
)

CONFIG_PATH = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_openclip_vit.json"
MODEL_NAME = CONFIG_PATH.stem  # open_clip registers a config file under its stem
ATOL = 1e-5

SENTENCES = [
    "a photo of a cat.",
    "A Photo Of A DOG!",
    "It's a dog's life, isn't it? We'll see; they've said you'd know.",
    "   lots    of\textra \n whitespace   here  ",
    "The 3 little pigs ate 42 apples in 2024 (and 7.5 pears).",
    "Numbers: 1,234,567.89 -- and $100 or 50% off!!!",
    "hyphen-ated words, e.g. state-of-the-art, and/or slashes",
    "UPPERCASE SHOUTING WITH PUNCTUATION?!?",
    "an emoji-free sentence with quotes \"like this\" and 'this'",
    "Café naïve résumé",
    "x",
    "",
    # long enough to be truncated (open_clip: to 77 ids with eot forced last)
    "a very long caption that keeps going " * 20,
    "supercalifragilisticexpialidocious " * 30,
]


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Randomise every parameter so zero biases / unit LayerNorms cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _tiny_cfg() -> dict:
    return json.loads(CONFIG_PATH.read_text())


@pytest.fixture(scope="module")
def models() -> dict:
    """open_clip tiny models (gelu and quick_gelu), their eval transforms and their conversions."""
    open_clip.add_model_config(CONFIG_PATH)  # offline: registers recipes/configs/tiny_openclip_vit.json
    out = {}
    for i, act in enumerate(("gelu", "quick_gelu")):
        torch.manual_seed(i)
        model, _, preprocess = open_clip.create_model_and_transforms(
            MODEL_NAME, pretrained=None, force_quick_gelu=act == "quick_gelu"
        )
        _perturb_(model, seed=i)
        model.eval()
        out[act] = (model, preprocess, open_clip_to_transformers(model))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return open_clip_tokenizer_to_transformers()


@pytest.fixture(params=["gelu", "quick_gelu"])
def triple(request, models):
    return models[request.param]


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def _gradient_image(width: int, height: int) -> Image.Image:
    xs = np.linspace(0, 255, width)[None, :]
    ys = np.linspace(0, 255, height)[:, None]
    r = np.broadcast_to(xs, (height, width))
    g = np.broadcast_to(ys, (height, width))
    b = (r + g) / 2
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------- model


def test_config_and_state(triple):
    oc, _, hf = triple
    assert isinstance(hf, CLIPModel) and not hf.training
    assert hf.dtype == oc.visual.conv1.weight.dtype == torch.float32
    cfg = hf.config
    assert cfg.architectures == ["CLIPModel"]
    expected_act = "quick_gelu" if isinstance(oc.visual.transformer.resblocks[0].mlp.gelu, QuickGELU) else "gelu"
    for sub in (cfg.vision_config, cfg.text_config):
        assert sub.hidden_act == expected_act
        assert sub.hidden_size == 64 and sub.num_hidden_layers == 4 and sub.intermediate_size == 256
        assert sub.layer_norm_eps == 1e-5 and sub.projection_dim == 32
    assert cfg.vision_config.num_attention_heads == 2 and cfg.text_config.num_attention_heads == 2
    assert cfg.vision_config.image_size == 32 and cfg.vision_config.patch_size == 8
    t = cfg.text_config
    assert (t.vocab_size, t.max_position_embeddings) == (49408, 77)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (49406, 49407, 49407)
    assert cfg.projection_dim == 32
    assert cfg.logit_scale_init_value == pytest.approx(oc.logit_scale.item())
    assert hf.logit_scale.item() == oc.logit_scale.item()
    # copies, not views of the teacher's storage
    oc_ptrs = {p.untyped_storage().data_ptr() for p in oc.parameters()}
    assert not oc_ptrs & {p.untyped_storage().data_ptr() for p in hf.parameters()}


def test_image_embeddings_match(triple):
    oc, _, hf = triple
    x = _images()
    with torch.no_grad():
        ref = oc.encode_image(x)
        got = hf.get_image_features(pixel_values=x).pooler_output  # v5: a ModelOutput, not a tensor
    assert got.shape == ref.shape == (4, 32)
    assert _max_diff(got, ref) < ATOL


def test_text_embeddings_match(triple, tokenizer):
    oc, _, hf = triple
    oc_ids = open_clip.tokenize(SENTENCES)
    enc = tokenizer(SENTENCES, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = oc.encode_text(oc_ids)
        # the same (0-padded) ids, and the HF tokenizer's (eos-padded) ids with and without its attention mask
        same_ids = hf.get_text_features(input_ids=oc_ids).pooler_output
        hf_ids = hf.get_text_features(input_ids=enc["input_ids"]).pooler_output
        hf_ids_mask = hf.get_text_features(**enc).pooler_output
    for got in (same_ids, hf_ids, hf_ids_mask):
        assert _max_diff(got, ref) < ATOL


def test_logits_match(triple, tokenizer):
    oc, _, hf = triple
    x = _images(3)
    ids = open_clip.tokenize(SENTENCES[:5])
    with torch.no_grad():
        ref_image_logits, _ = oc.get_logits(x, ids)
        out = hf(input_ids=ids, pixel_values=x)
    assert hf.logit_scale.item() == oc.logit_scale.item()
    assert _max_diff(out.logits_per_image, ref_image_logits) < 1e-4  # logits are scaled by exp(2.66) ~ 14


def _block_hooks(transformer: torch.nn.Module, store: list) -> list:
    """Capture the input of the first residual block and each block's output, as (batch, seq, width)."""

    def to_nld(x: torch.Tensor) -> torch.Tensor:
        return x if transformer.batch_first else x.transpose(0, 1)

    blocks = transformer.resblocks
    handles = [blocks[0].register_forward_pre_hook(lambda _m, args: store.append(to_nld(args[0])))]
    handles += [b.register_forward_hook(lambda _m, _a, out: store.append(to_nld(out))) for b in blocks]
    return handles


def test_vision_hidden_states_match(triple):
    oc, _, hf = triple
    assert oc.visual.transformer.batch_first  # open_clip 3.x runs its transformers batch-first
    x = _images(2)
    store: list = []
    handles = _block_hooks(oc.visual.transformer, store)
    try:
        with torch.no_grad():
            oc.encode_image(x)
            out = hf.vision_model(pixel_values=x, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == len(store) == 5  # input of layer 0 (after pre_layrnorm) + 4 layer outputs
    for ref, got in zip(store, out.hidden_states, strict=True):
        assert got.shape == ref.shape == (2, 17, 64)
        assert _max_diff(got, ref) < ATOL


def test_text_hidden_states_match(triple):
    oc, _, hf = triple
    assert oc.transformer.batch_first
    ids = open_clip.tokenize(SENTENCES[:4])
    store: list = []
    handles = _block_hooks(oc.transformer, store)
    try:
        with torch.no_grad():
            oc.encode_text(ids)
            out = hf.text_model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == len(store) == 5
    for ref, got in zip(store, out.hidden_states, strict=True):
        assert got.shape == ref.shape == (4, 77, 64)
        assert _max_diff(got, ref) < ATOL


def test_source_dtype_is_kept(models):
    oc = copy.deepcopy(models["gelu"][0]).to(torch.float64)
    hf = open_clip_to_transformers(oc)
    assert hf.dtype == torch.float64 and not hf.training
    x = _images(2).double()
    ids = open_clip.tokenize(SENTENCES[:3])
    with torch.no_grad():
        assert _max_diff(hf.get_image_features(pixel_values=x).pooler_output, oc.encode_image(x)) < 1e-10
        assert _max_diff(hf.get_text_features(input_ids=ids).pooler_output, oc.encode_text(ids)) < 1e-10


def test_text_projection_as_linear(models):
    """open_clip's text projection can be an nn.Linear (bias-free) instead of a (width, embed) parameter."""
    oc = copy.deepcopy(models["gelu"][0])
    proj = oc.text_projection.detach()
    linear = torch.nn.Linear(proj.shape[0], proj.shape[1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(proj.t())
    del oc.text_projection  # a registered Parameter cannot be replaced by a module in place
    oc.text_projection = linear
    hf = open_clip_to_transformers(oc)
    ids = open_clip.tokenize(SENTENCES[:3])
    with torch.no_grad():
        assert _max_diff(hf.get_text_features(input_ids=ids).pooler_output, oc.encode_text(ids)) < ATOL
    assert torch.equal(hf.text_projection.weight, linear.weight)


def test_final_ln_after_pool_with_class_token_is_exact():
    """Accepted on purpose: LayerNorm is per token, so pooling the class token before or after ln_post is equal."""
    cfg = _tiny_cfg()
    cfg["vision_cfg"]["final_ln_after_pool"] = True
    torch.manual_seed(3)
    oc = open_clip.CLIP(**cfg).eval()
    _perturb_(oc, seed=3)
    hf = open_clip_to_transformers(oc)
    x = _images(2)
    with torch.no_grad():
        assert _max_diff(hf.get_image_features(pixel_values=x).pooler_output, oc.encode_image(x)) < ATOL


def test_round_trip(models, tmp_path):
    oc, _, hf = models["quick_gelu"]
    processor = open_clip_processor(oc)
    assert isinstance(processor, CLIPProcessor)
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    hf2 = CLIPModel.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(proc2, CLIPProcessor)
    assert isinstance(proc2.tokenizer, CLIPTokenizer) and isinstance(proc2.image_processor, CLIPImageProcessor)
    assert hf2.config.architectures == ["CLIPModel"] and hf2.config.text_config.hidden_act == "quick_gelu"
    assert hf2.config.open_clip_preprocess_cfg == hf.config.open_clip_preprocess_cfg

    images = [_gradient_image(64, 48), _gradient_image(40, 56)]
    inputs = processor(text=SENTENCES[:4], images=images, padding="max_length", truncation=True, return_tensors="pt")
    inputs2 = proc2(text=SENTENCES[:4], images=images, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    assert torch.equal(inputs["pixel_values"], inputs2["pixel_values"])
    with torch.no_grad():
        before, after = hf(**inputs), hf2.eval()(**inputs2)
        ref_img = oc.encode_image(inputs["pixel_values"])
        ref_txt = oc.encode_text(open_clip.tokenize(SENTENCES[:4]))
    assert _max_diff(after.image_embeds, before.image_embeds) == 0
    assert _max_diff(after.text_embeds, before.text_embeds) == 0
    assert _max_diff(after.vision_model_output.pooler_output, before.vision_model_output.pooler_output) == 0
    with torch.no_grad():
        assert _max_diff(hf2.get_image_features(pixel_values=inputs2["pixel_values"]).pooler_output, ref_img) < ATOL
        assert _max_diff(hf2.get_text_features(**{k: inputs2[k] for k in ("input_ids", "attention_mask")}).pooler_output, ref_txt) < ATOL


def test_zero_shot_pipeline_loads_saved_dir(models, tmp_path):
    from transformers import pipeline

    oc, _, hf = models["gelu"]
    hf.save_pretrained(tmp_path)
    open_clip_processor(oc).save_pretrained(tmp_path)
    clf = pipeline("zero-shot-image-classification", model=str(tmp_path))
    out = clf(_gradient_image(48, 40), candidate_labels=["cat", "dog", "car"])
    assert sorted(o["label"] for o in out) == ["car", "cat", "dog"]
    assert sum(o["score"] for o in out) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_open_clip(tokenizer):
    assert isinstance(tokenizer, CLIPTokenizer)  # in v5 the only CLIPTokenizer: TokenizersBackend (fast) based
    assert tokenizer.backend_tokenizer is not None
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|endoftext|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408

    ref = open_clip.tokenize(SENTENCES).tolist()
    got = tokenizer(SENTENCES, padding="max_length", max_length=77, truncation=True)["input_ids"]
    n_truncated = 0
    for text, r, g in zip(SENTENCES, ref, got, strict=True):
        assert len(g) == 77
        end = r.index(OPENCLIP_EOS_TOKEN_ID) + 1
        assert g[:end] == r[:end], text
        assert all(t == 0 for t in r[end:]) and all(t == OPENCLIP_EOS_TOKEN_ID for t in g[end:])
        n_truncated += end == 77
    assert n_truncated == 2


def test_tokenizer_truncation(tokenizer):
    long_text = SENTENCES[-2]
    untruncated = tokenizer(long_text)["input_ids"]
    assert len(untruncated) > 77  # transformers does not truncate unless asked to
    ref = open_clip.tokenize([long_text])[0].tolist()
    assert ref[-1] == OPENCLIP_EOS_TOKEN_ID  # open_clip keeps 75 content ids and forces eot last
    got = tokenizer(long_text, truncation=True)["input_ids"]  # max_length defaults to model_max_length
    assert got == ref == untruncated[:76] + [OPENCLIP_EOS_TOKEN_ID]

    short = open_clip_tokenizer_to_transformers(context_length=16)
    assert short.model_max_length == 16
    ref16 = open_clip.tokenize(SENTENCES, context_length=16).tolist()
    got16 = short(SENTENCES, padding="max_length", truncation=True)["input_ids"]
    for r, g in zip(ref16, got16, strict=True):
        end = r.index(OPENCLIP_EOS_TOKEN_ID) + 1
        assert len(g) == 16 and g[:end] == r[:end]


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, CLIPTokenizer) and loaded.model_max_length == 77
    assert loaded.pad_token_id == loaded.eos_token_id == 49407 and loaded.bos_token_id == 49406
    kw = {"padding": "max_length", "max_length": 77, "truncation": True}
    assert loaded(SENTENCES, **kw)["input_ids"] == tokenizer(SENTENCES, **kw)["input_ids"]


def test_tokenizer_documented_differences(tokenizer):
    """open_clip runs ftfy + html.unescape first; transformers does not (documented, not 'ordinary' text)."""
    for text in ("fish &amp; chips", "it\u2019s \u201cquoted\u201d"):
        ref = open_clip.tokenize([text])[0].tolist()
        got = tokenizer(text)["input_ids"]
        assert got != ref[: ref.index(OPENCLIP_EOS_TOKEN_ID) + 1]


# ------------------------------------------------------------------------------------------------- image processor


def test_image_processor_config(models, tmp_path):
    oc, _, _ = models["gelu"]
    ip = image_processor_from_open_clip(oc)
    ip.save_pretrained(tmp_path)
    # the class AutoImageProcessor resolves for "clip" in transformers v5 (torchvision backend)
    auto_cls = type(AutoImageProcessor.from_pretrained(tmp_path))
    assert type(ip) is CLIPImageProcessor is auto_cls
    assert ip.size == {"shortest_edge": 32} and ip.crop_size == {"height": 32, "width": 32}
    assert ip.do_center_crop and ip.do_rescale and ip.do_normalize and ip.do_convert_rgb
    assert ip.rescale_factor == pytest.approx(1 / 255) and int(ip.resample) == int(Image.Resampling.BICUBIC)
    assert list(ip.image_mean) == list(open_clip.OPENAI_DATASET_MEAN)
    assert list(ip.image_std) == list(open_clip.OPENAI_DATASET_STD)
    # overrides recorded at conversion time are used when given the converted model
    hf = open_clip_to_transformers(oc, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    ip2 = image_processor_from_open_clip(hf)
    assert list(ip2.image_mean) == [0.5] * 3 and list(ip2.image_std) == [0.25] * 3 and ip2.crop_size["height"] == 32
    ip3 = image_processor_from_open_clip({"size": 224, "mean": 0.5, "std": 0.5, "interpolation": "bilinear"})
    assert ip3.size == {"shortest_edge": 224} and int(ip3.resample) == int(Image.Resampling.BILINEAR)
    with pytest.raises(ValueError, match="resize_mode"):
        image_processor_from_open_clip({"size": 224, "resize_mode": "longest"})


# One uint8 level after normalisation is 1 / (255 * std) <= 1 / (255 * 0.2613) = 0.0150. transformers' default
# (torchvision) CLIP processor resizes a uint8 tensor with torch's antialiased bicubic, open_clip resizes the PIL image
# with PIL's bicubic: they agree except for occasional +-1 uint8 rounding differences (measured max 0.0142).
ONE_LEVEL = 1 / (255 * min(open_clip.OPENAI_DATASET_STD)) + 1e-6


@pytest.mark.parametrize("size", [(64, 48), (97, 61), (40, 56)])
def test_image_processor_matches_open_clip_transform(models, size):
    oc, preprocess, _ = models["gelu"]
    img = _gradient_image(*size)
    ref = preprocess(img)
    got = image_processor_from_open_clip(oc)(img, return_tensors="pt")["pixel_values"][0]
    assert got.shape == ref.shape == (3, 32, 32)
    assert _max_diff(got, ref) <= ONE_LEVEL
    assert (got - ref).abs().mean().item() < 1e-3


def test_image_processor_centre_crop_offset_difference(models):
    """Documented difference: transformers centre-crops at int((h - c) / 2), torchvision at round((h - c) / 2).

    A 35x32 image is not resized (shortest edge 32) and cropped from 35 to 32 columns: transformers starts at column 1,
    open_clip at round(1.5) = 2. Shifted by that column the outputs agree exactly.
    """
    oc, preprocess, _ = models["gelu"]
    img = _gradient_image(35, 32)
    ref = preprocess(img)
    got = image_processor_from_open_clip(oc)(img, return_tensors="pt")["pixel_values"][0]
    assert _max_diff(got, ref) > 0.05
    assert _max_diff(got[..., 1:], ref[..., :-1]) < 1e-5


# --------------------------------------------------------------------------------------------------- unsupported


def _modified(vision: dict | None = None, text: dict | None = None, **top) -> dict:
    cfg = _tiny_cfg()
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    cfg.update(top)
    return cfg


_UNSUPPORTED = {
    "vision-ls_init_value": (_modified(vision={"ls_init_value": 1e-4}), "LayerScale"),
    "text-ls_init_value": (_modified(text={"ls_init_value": 1e-4}), "LayerScale"),
    "attentional_pool": (
        _modified(vision={"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}),
        "attentional pooling",
    ),
    "vision-pool_type-avg": (_modified(vision={"pool_type": "avg"}), "vision pool_type 'avg'"),
    "no_ln_pre": (_modified(vision={"no_ln_pre": True}), "no_ln_pre"),
    "qk_norm": (_modified(vision={"qk_norm": True}), "custom attention block"),
    "no_causal_mask": (_modified(text={"no_causal_mask": True}), "non-causal text mask"),
    "text-pool_type-last": (_modified(text={"pool_type": "last"}), "text pool_type 'last'"),
    "text-proj_bias": (_modified(text={"proj_bias": True}), "bias in the text projection"),
    "embed_cls": (_modified(text={"embed_cls": True}), "context length"),
    "vocab_size": (_modified(text={"vocab_size": 1000}), "vocabulary"),
    "logit_bias": (_modified(init_logit_bias=-10.0), "logit_bias"),
    "modified_resnet": (_modified(vision={"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}), "ModifiedResNet"),
}


@pytest.mark.parametrize(("cfg", "feature"), list(_UNSUPPORTED.values()), ids=list(_UNSUPPORTED))
def test_unsupported_features_raise(cfg, feature):
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    with pytest.raises(ValueError, match=feature):
        open_clip_to_transformers(model)


def test_unsupported_model_classes_raise():
    torch.manual_seed(0)
    custom = open_clip.CustomTextCLIP(**_tiny_cfg())
    with pytest.raises(ValueError, match="CustomTextCLIP"):
        open_clip_to_transformers(custom)


def test_unsupported_monkeypatched(models):
    oc = copy.deepcopy(models["gelu"][0])
    oc.visual.conv1.bias = torch.nn.Parameter(torch.zeros(oc.visual.conv1.out_channels))
    with pytest.raises(ValueError, match="patch embedding"):
        open_clip_to_transformers(oc)
    oc = copy.deepcopy(models["gelu"][0])
    oc.visual.transformer.resblocks[2].mlp.gelu = torch.nn.SiLU()
    with pytest.raises(ValueError, match="activation SiLU"):
        open_clip_to_transformers(oc)
    oc = copy.deepcopy(models["gelu"][0])
    oc.transformer.resblocks[1].ln_1.eps = 1e-6
    with pytest.raises(ValueError, match="LayerNorm eps"):
        open_clip_to_transformers(oc)
