"""Half-depth students: layer selection, weight copy, and the proof that the conversion is exact."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel

from mmkd.students import build_student, count_parameters, select_layers
from mmkd.students.clip import student_depth


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("every_other", [0, 2, 4, 6, 8, 10]),
        ("distilbert", [0, 2, 4, 7, 9, 11]),
        ("odd", [1, 3, 5, 7, 9, 11]),
        ("first", [0, 1, 2, 3, 4, 5]),
    ],
)
def test_layer_strategies_12_to_6(strategy, expected):
    assert select_layers(12, 6, strategy) == expected


def test_default_depth_is_half_rounded_up():
    assert student_depth(12) == 6
    assert student_depth(5) == 3
    assert student_depth(2) == 1
    assert select_layers(5, 3, "distilbert") == [0, 2, 4]


def test_impossible_requests_name_the_value(hf_teacher):
    full = hf_teacher.model
    with pytest.raises(ValueError, match="depth 4"):
        build_student(full, vision_depth=4)
    with pytest.raises(ValueError, match="depth 9"):
        build_student(full, text_depth=9)
    with pytest.raises(ValueError, match="index 7"):
        build_student(full, vision_layers=[0, 7])
    with pytest.raises(ValueError, match="'alternate'"):
        build_student(full, strategy="alternate")
    with pytest.raises(ValueError, match="'alternate'"):
        select_layers(12, 6, "alternate")


def test_student_keeps_widths_and_copies_the_chosen_layers(hf_teacher):
    teacher = hf_teacher.model
    student, init = build_student(teacher, strategy="distilbert", teacher_name="tiny")
    sc, tc = student.config, teacher.config
    assert sc.vision_config.num_hidden_layers == 2 and sc.text_config.num_hidden_layers == 2
    for a in ("hidden_size", "intermediate_size", "num_attention_heads"):
        assert getattr(sc.vision_config, a) == getattr(tc.vision_config, a)
        assert getattr(sc.text_config, a) == getattr(tc.text_config, a)
    assert sc.vision_config.patch_size == tc.vision_config.patch_size
    assert sc.text_config.max_position_embeddings == tc.text_config.max_position_embeddings
    assert sc.projection_dim == tc.projection_dim
    assert init.vision_layers == init.text_layers == [0, 3]
    tsd, ssd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate(init.vision_layers):
        torch.testing.assert_close(
            ssd[f"vision_model.encoder.layers.{j}.mlp.fc1.weight"], tsd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"]
        )
    for j, i in enumerate(init.text_layers):
        torch.testing.assert_close(
            ssd[f"text_model.encoder.layers.{j}.self_attn.q_proj.weight"],
            tsd[f"text_model.encoder.layers.{i}.self_attn.q_proj.weight"],
        )
    for k in ("visual_projection.weight", "text_projection.weight", "logit_scale",
              "text_model.embeddings.token_embedding.weight", "vision_model.post_layernorm.weight"):
        torch.testing.assert_close(ssd[k], tsd[k])
    counts_s, counts_t = count_parameters(student), count_parameters(teacher)
    assert counts_s["total"] < counts_t["total"]
    assert counts_s["total"] == counts_s["vision"] + counts_s["text"] + 1  # + logit_scale


def test_random_student_copies_nothing(hf_teacher):
    student, init = build_student(hf_teacher.model, strategy="random", seed=1)
    assert init.vision_layers == [] and init.text_layers == []
    assert not torch.equal(student.visual_projection.weight, hf_teacher.model.visual_projection.weight)
    again, _ = build_student(hf_teacher.model, strategy="random", seed=1)
    torch.testing.assert_close(again.state_dict(), student.state_dict())


def test_full_depth_student_reproduces_the_teacher_exactly(teacher):
    """Proof of the conversion: keep every layer and the student's embeddings are the teacher's to 1e-5."""
    full = teacher.to_transformers()
    n_v, n_t = full.config.vision_config.num_hidden_layers, full.config.text_config.num_hidden_layers
    student, _ = build_student(full, vision_depth=n_v, text_depth=n_t, allow_full_depth=True)
    student.eval()
    inputs = teacher.inputs()
    proc = teacher.transformers_processor()
    texts = ["a photo of a cat", "A RED circle, on a plain background!", "two dogs playing in the snow"]
    pixels = torch.randn(3, 3, 32, 32)
    enc = proc.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        s_img = student.visual_projection(student.vision_model(pixel_values=pixels).pooler_output)
        s_txt = student.text_projection(student.text_model(**enc).pooler_output)
    t_img = teacher.encode_image(pixels)
    t_txt = teacher.encode_text(**inputs.texts(texts))
    assert (s_img - t_img).abs().max() < 1e-5
    assert (s_txt - t_txt).abs().max() < 1e-5
    torch.testing.assert_close(student.logit_scale.exp(), teacher.logit_scale)


def test_student_round_trips_as_a_stock_clip_model(tmp_path, open_clip_teacher):
    student, init = build_student(open_clip_teacher.to_transformers(), teacher_name=open_clip_teacher.name)
    student.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path)
    assert reloaded.config.distillation_init["vision_layers"] == init.vision_layers == [0, 2]
    assert reloaded.config.distillation_init["teacher"] == "tiny_openclip_vit"
    torch.testing.assert_close(reloaded.state_dict(), student.state_dict())
