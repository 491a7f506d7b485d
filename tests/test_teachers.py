"""The frozen teacher adapters: both backends, one interface."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmkd.teachers import (
    OpenCLIPTeacher,
    TransformersCLIPTeacher,
    load_teacher,
    resolve_backend,
)
from tests.conftest import TINY_OPEN_CLIP_CONFIG

TEXTS = ["a photo of a cat", "A red circle, on a plain background!", "two dogs"]


def _images(n=3):
    return [Image.new("RGB", (40 + 7 * i, 32), (30 * i, 200 - 40 * i, 90)) for i in range(n)]


def test_backends_are_resolved(tmp_path, tiny_hf_clip_dir):
    assert resolve_backend(str(TINY_OPEN_CLIP_CONFIG)) == "open_clip"
    assert resolve_backend("ViT-B-32") == "open_clip"
    assert resolve_backend("hf-hub:timm/ViT-B-32-quickgelu") == "open_clip"
    assert resolve_backend(str(tiny_hf_clip_dir)) == "transformers"
    assert resolve_backend("openai/clip-vit-base-patch32") == "transformers"
    with pytest.raises(ValueError, match="neither"):
        resolve_backend(str(tmp_path))
    with pytest.raises(ValueError, match="'onnx'"):
        resolve_backend("ViT-B-32", backend="onnx")


def test_teacher_types(open_clip_teacher, hf_teacher):
    assert isinstance(open_clip_teacher, OpenCLIPTeacher) and open_clip_teacher.backend == "open_clip"
    assert isinstance(hf_teacher, TransformersCLIPTeacher) and hf_teacher.backend == "transformers"


def test_teacher_is_frozen_for_good(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    with pytest.raises(RuntimeError, match="frozen"):
        teacher.requires_grad_(True)
    ids = teacher.inputs().texts(TEXTS)
    pixels = torch.randn(3, 3, 32, 32, requires_grad=True)
    out = teacher(pixel_values=pixels, **ids)
    assert not out.image_embeds.requires_grad and not out.text_embeds.requires_grad


def test_embeddings_and_hidden_states_are_consistent(teacher):
    """The last hidden state, pooled and projected the backend's own way, gives the returned embedding."""
    inputs = teacher.inputs()
    pixels = inputs.images(_images())
    ids = inputs.texts(TEXTS)
    out = teacher(pixel_values=pixels, output_hidden_states=True, **ids)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, teacher.model.config.projection_dim
                                                               if teacher.backend == "transformers" else 32)
    m = teacher.model
    if teacher.backend == "open_clip":
        assert len(out.image_hidden_states) == len(m.visual.transformer.resblocks) + 1
        img = m.visual.ln_post(out.image_hidden_states[-1][:, 0]) @ m.visual.proj
        txt_ids = ids["input_ids"]
        last = m.ln_final(out.text_hidden_states[-1])
        txt = last[torch.arange(3), txt_ids.argmax(dim=-1)] @ m.text_projection
    else:
        assert len(out.image_hidden_states) == m.config.vision_config.num_hidden_layers + 1
        img = m.visual_projection(m.vision_model.post_layernorm(out.image_hidden_states[-1][:, 0]))
        last = m.text_model.final_layer_norm(out.text_hidden_states[-1])
        eos = (ids["input_ids"] == m.config.text_config.eos_token_id).int().argmax(dim=-1)
        txt = m.text_projection(last[torch.arange(3), eos])
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds_normalized, F.normalize(out.image_embeds, dim=-1))
    assert torch.allclose(out.logit_scale, m.logit_scale.exp())
    torch.testing.assert_close(teacher.encode_image(pixels, normalize=True), out.image_embeds_normalized)
    torch.testing.assert_close(teacher.encode_text(**ids), out.text_embeds)


def test_transformers_teacher_matches_clip_model(hf_teacher):
    ids = hf_teacher.inputs().texts(TEXTS)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_img = hf_teacher.model.get_image_features(pixel_values=pixels)
        ref_txt = hf_teacher.model.get_text_features(**ids)
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    torch.testing.assert_close(hf_teacher.encode_image(pixels), ref_img)
    torch.testing.assert_close(hf_teacher.encode_text(**ids), ref_txt)


def test_open_clip_text_padding_does_not_matter(open_clip_teacher):
    """ids padded to the longest caption (transformers style) give the same embedding as open_clip's 77."""
    full = open_clip_teacher.inputs().texts(TEXTS)["input_ids"]  # (3, 77), zero padded
    longest = int((full != 0).sum(dim=1).max())
    short = full[:, :longest].clone()
    short[short == 0] = 49407  # a transformers CLIP tokenizer pads with <|endoftext|>
    torch.testing.assert_close(open_clip_teacher.encode_text(short), open_clip_teacher.encode_text(full))


def test_open_clip_local_checkpoint_and_weights_hash(tmp_path, open_clip_teacher):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": open_clip_teacher.model.state_dict()}, ckpt)
    reloaded = load_teacher(str(TINY_OPEN_CLIP_CONFIG), pretrained=str(ckpt))
    assert reloaded.weights_hash() == open_clip_teacher.weights_hash()
    other = load_teacher(str(TINY_OPEN_CLIP_CONFIG))  # fresh random weights
    assert other.weights_hash() != open_clip_teacher.weights_hash()


def test_bad_teacher_specs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_teacher(str(TINY_OPEN_CLIP_CONFIG), pretrained=str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_teacher(str(bad))
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg"):
        load_teacher(str(incomplete))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_teacher(str(tmp_path / "nope.json"))


def test_teacher_transformers_processor_and_inputs_signatures(teacher):
    """A student's processor derived from the teacher has the teacher's exact image preprocessing signature."""
    from mmkd.data.preprocessing import vocab_signature
    from mmkd.interop.preprocessing import image_signature_from_processor

    proc = teacher.transformers_processor()
    inputs = teacher.inputs()
    assert image_signature_from_processor(proc.image_processor) == inputs.image_signature
    assert vocab_signature(proc.tokenizer.get_vocab(), 77) == inputs.text_signature


def test_teacher_is_cast_and_moved(open_clip_teacher):
    import copy

    t = copy.deepcopy(open_clip_teacher).to(torch.bfloat16)
    assert t.dtype == torch.bfloat16
    out = t(pixel_values=torch.randn(2, 3, 32, 32))  # fp32 pixels are cast to the teacher's dtype
    assert out.image_embeds.dtype == torch.bfloat16


def test_pooled_features_times_projection_are_the_embeddings(teacher):
    """What SimKD reuses: the pre-projection pooled feature and the projection, for both backends."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0], [49406, 320, 1929, 539, 1125, 49407]])
    out = teacher(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
    for tower, states, embeds in (("image", out.image_hidden_states, out.image_embeds),
                                  ("text", out.text_hidden_states, out.text_embeds)):
        pooled = teacher.pooled_features(tower, states[-1], ids)
        torch.testing.assert_close(pooled @ teacher.projection(tower).T, embeds, rtol=1e-5, atol=1e-5)
        assert teacher.projection(tower).shape == (embeds.shape[1], teacher.hidden_widths()["vision" if tower == "image" else "text"])


def _text_lengths(teacher):
    """Record the sequence length every run of the teacher's text transformer sees."""
    seen: list[int] = []
    handle = teacher.model.transformer.register_forward_pre_hook(lambda m, args, kw=None: seen.append(
        args[0].shape[1]))
    return seen, handle


def test_open_clip_text_tower_runs_on_the_longest_caption(open_clip_teacher):
    """The causal text tower runs on the batch's longest caption, not 77 positions, with open_clip's embeddings
    (to 1e-5); with hidden states it runs at the given ids' length; a non-causal tower still sees all 77."""
    from mmkd.teachers.openclip import trimmed_length

    teacher, model = open_clip_teacher, open_clip_teacher.model
    full = teacher.inputs().texts(TEXTS)["input_ids"]  # (3, 77), zero padded
    longest = int((full != 0).sum(dim=1).max())
    assert trimmed_length(full) == longest < 77 and trimmed_length(torch.zeros(2, 5, dtype=torch.long)) == 1
    assert teacher.trims_text
    with torch.no_grad():
        reference = model.encode_text(full)
    seen, handle = _text_lengths(teacher)
    try:
        trimmed = teacher.encode_text(full)
        out = teacher(pixel_values=torch.randn(3, 3, 32, 32), output_hidden_states=True, input_ids=full[:, :20])
    finally:
        handle.remove()
    assert seen == [longest, 20]
    torch.testing.assert_close(trimmed, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds, reference, atol=1e-5, rtol=1e-5)
    assert all(h.shape[1] == 20 for h in out.text_hidden_states)

    causal_mask = model.attn_mask
    model.attn_mask = None  # a bidirectional tower: every position matters, so it keeps open_clip's 77
    try:
        assert not teacher.trims_text
        seen, handle = _text_lengths(teacher)
        try:
            with torch.no_grad():
                bidirectional = model.encode_text(full)
            assert seen == [77]
            torch.testing.assert_close(teacher.encode_text(full[:, :longest]), bidirectional)
        finally:
            handle.remove()
        assert seen == [77, 77]
    finally:
        model.attn_mask = causal_mask
