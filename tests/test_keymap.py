"""Tests for mmkd.interop.keymap: one open_clip <-> transformers key table, used by both converters."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from mmkd.interop import keymap
from mmkd.interop.keymap import KeyMapError, hf_to_open_clip_state_dict, key_table, open_clip_to_hf_state_dict
from mmkd.interop.to_open_clip import clip_model_to_open_clip
from mmkd.interop.to_transformers import open_clip_to_transformers
from tests.conftest import TINY_OPEN_CLIP_CONFIG

# different depths per tower, so a swapped layer count cannot go unnoticed
N_VISION, N_TEXT = 3, 2


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Randomise every parameter so zero biases / unit LayerNorms cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, CLIPModel]:
    """A perturbed open_clip CLIP and a CLIPModel of the same architecture, built by hand (not by the table)."""
    cfg = json.loads(TINY_OPEN_CLIP_CONFIG.read_text())
    cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"] = N_VISION, N_TEXT
    torch.manual_seed(0)
    oc = open_clip.CLIP(**cfg).eval()
    _perturb_(oc, seed=1)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    hf_cfg = CLIPConfig(
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"],
                           num_hidden_layers=N_VISION, num_attention_heads=v["width"] // v["head_width"],
                           image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu",
                           projection_dim=cfg["embed_dim"]),
        text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["width"], intermediate_size=4 * t["width"],
                         num_hidden_layers=N_TEXT, num_attention_heads=t["heads"],
                         max_position_embeddings=t["context_length"], hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         projection_dim=cfg["embed_dim"]),
        projection_dim=cfg["embed_dim"],
    )
    return oc, CLIPModel(hf_cfg).eval()


def test_table_covers_both_state_dicts_exactly(pair):
    oc, hf = pair
    table = key_table(N_VISION, N_TEXT)
    oc_sd, hf_sd = oc.state_dict(), hf.state_dict()
    assert sorted(e.open_clip for e in table) == sorted(oc_sd)
    hf_keys = sorted(k for k in hf_sd if not k.endswith("position_ids"))
    assert sorted(k for e in table for k in e.hf) == hf_keys
    assert {e.transform for e in table} == {"identity", "transpose", "scalar", "qkv"}


def test_open_clip_to_hf_produces_every_key_and_the_same_model(pair):
    oc, hf = pair
    mapped = open_clip_to_hf_state_dict(oc.state_dict(), N_VISION, N_TEXT)
    ref = hf.state_dict()
    assert set(mapped) == set(ref)
    for key, value in mapped.items():
        assert value.shape == ref[key].shape, key
    model = CLIPModel(hf.config).eval()
    model.load_state_dict(mapped, strict=True)
    # the layouts are right, not only the names: the same embeddings as open_clip
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = open_clip.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   oc.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output,
                                   oc.encode_text(ids), atol=1e-5, rtol=0)


def test_round_trips_are_bitwise_identities(pair):
    oc, hf = pair
    hf = CLIPModel(hf.config)
    _perturb_(hf, seed=2)
    hf_sd = hf.state_dict()
    back = open_clip_to_hf_state_dict(hf_to_open_clip_state_dict(hf_sd, N_VISION, N_TEXT), N_VISION, N_TEXT)
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key
    oc_sd = oc.state_dict()
    back = hf_to_open_clip_state_dict(open_clip_to_hf_state_dict(oc_sd, N_VISION, N_TEXT), N_VISION, N_TEXT)
    assert set(back) == set(oc_sd)
    for key, value in oc_sd.items():
        assert torch.equal(back[key], value), key


def test_transforms(pair):
    oc, _ = pair
    oc_sd = oc.state_dict()
    hf_sd = open_clip_to_hf_state_dict(oc_sd, N_VISION, N_TEXT)
    assert torch.equal(hf_sd["visual_projection.weight"], oc_sd["visual.proj"].t())
    assert torch.equal(hf_sd["text_projection.weight"], oc_sd["text_projection"].t())
    p, o = "text_model.encoder.layers.1.self_attn", "transformer.resblocks.1.attn"
    for part in ("weight", "bias"):
        qkv = [hf_sd[f"{p}.{x}_proj.{part}"] for x in "qkv"]
        assert torch.equal(torch.cat(qkv), oc_sd[f"{o}.in_proj_{part}"])
    assert hf_sd["logit_scale"].shape == ()


def test_unknown_and_missing_keys_are_refused(pair):
    oc, hf = pair
    hf_sd = dict(hf.state_dict())
    hf_sd["visual_projection.bias"] = torch.zeros(32)
    with pytest.raises(KeyMapError, match=r"visual_projection\.bias") as exc:
        hf_to_open_clip_state_dict(hf_sd, N_VISION, N_TEXT)
    assert exc.value.unmapped == ["visual_projection.bias"] and not exc.value.missing
    # the tower depths are part of the table: a block more than it says is unmapped, one less is missing
    with pytest.raises(KeyMapError, match=r"text_model\.encoder\.layers\.1\."):
        hf_to_open_clip_state_dict(hf.state_dict(), N_VISION, N_TEXT - 1)
    oc_sd = dict(oc.state_dict())
    oc_sd["visual.attn_pool.query"] = torch.zeros(1)
    with pytest.raises(KeyMapError, match=r"visual\.attn_pool\.query"):
        open_clip_to_hf_state_dict(oc_sd, N_VISION, N_TEXT)
    del oc_sd["visual.attn_pool.query"], oc_sd["ln_final.bias"]
    with pytest.raises(KeyMapError, match=r"missing \['ln_final\.bias'\]") as exc:
        open_clip_to_hf_state_dict(oc_sd, N_VISION, N_TEXT)
    assert exc.value.missing == ["ln_final.bias"]
    with pytest.raises(ValueError, match=r"missing \['transformer\.resblocks\.2\.ln_1\.weight'"):
        open_clip_to_hf_state_dict(oc.state_dict(), N_VISION, N_TEXT + 1)


def test_both_converters_read_the_one_table(pair, monkeypatch):
    """Swap ln_1 <-> ln_2 in the table (same shapes): both directions follow it, so it is the only map."""
    oc, _ = pair
    swapped = {"layer_norm1.": "layer_norm2.", "layer_norm2.": "layer_norm1."}
    block = tuple((o, swapped.get(h[:12], h[:12]) + h[12:], t) for o, h, t in keymap._BLOCK)
    assert block != keymap._BLOCK
    monkeypatch.setattr(keymap, "_BLOCK", block)
    hf = open_clip_to_transformers(oc)
    layer, res = hf.vision_model.encoder.layers[0], oc.visual.transformer.resblocks[0]
    assert torch.equal(layer.layer_norm1.weight, res.ln_2.weight)
    assert torch.equal(layer.layer_norm2.bias, res.ln_1.bias)
    _, sd = clip_model_to_open_clip(hf)  # the export swaps back: the round trip is still the identity
    assert torch.equal(sd["visual.transformer.resblocks.0.ln_1.weight"], layer.layer_norm2.weight)
    for key, value in oc.state_dict().items():
        assert torch.equal(sd[key], value), key
