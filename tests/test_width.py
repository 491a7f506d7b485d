"""Students of any width: shape checks, weight inheritance that slices every tensor consistently, and the cases where
it is exact (keeping everything; dropping units whose outgoing weights are zero)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from mmkd.checks import ConfigError
from mmkd.students import build_student
from mmkd.students.width import TowerShape, resolve_width

LAYERS, WIDTH, HEADS, MLP = 4, 64, 4, 128  # head size 16


def teacher_config() -> CLIPConfig:
    tower = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    return CLIPConfig(
        text_config=dict(vocab_size=300, max_position_embeddings=12, eos_token_id=299, bos_token_id=298,
                         pad_token_id=299, **tower),
        vision_config=dict(image_size=16, patch_size=4, **tower),
        projection_dim=24,
    )


@pytest.fixture
def teacher() -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(teacher_config()).eval()
    with torch.no_grad():  # random LayerNorms and biases, so a wrong slice of one of them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 298, (3, 12), generator=g)
    ids[:, -1] = 299
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def features(model: CLIPModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (model.get_image_features(pixel_values=inputs["pixel_values"]),
                model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))


@pytest.mark.parametrize("importance", ["magnitude", "first"])
def test_keeping_every_channel_reproduces_the_depth_only_student(teacher, importance):
    plain, _ = build_student(teacher)
    full_width, _ = build_student(teacher, vision_width=WIDTH, text_width=WIDTH, vision_heads=HEADS,
                                  text_heads=HEADS, vision_mlp_width=MLP, text_mlp_width=MLP, importance=importance)
    a, b = plain.state_dict(), full_width.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    plan = full_width.config.distillation_init["width_plan"]["vision"]
    assert plan["hidden"] == list(range(WIDTH)) and plan["heads"] == [list(range(HEADS))] * 2


def _expected(teacher_sd, plan, layer_of, key, tensor_name, hd_student):
    """The teacher tensor the student's ``key`` must hold, sliced by hand from the recorded plan."""
    hidden = torch.tensor(plan["hidden"])
    hd = plan["teacher_head_dim"]

    def rows(j, dims):
        return torch.cat([torch.arange(h * hd, (h + 1) * hd)[torch.tensor(d)]
                          for h, d in zip(plan["heads"][j], plan[dims][j], strict=True)])

    if ".encoder.layers." in key:
        j = int(key.split(".encoder.layers.")[1].split(".")[0])
        t = teacher_sd[key.replace(f"layers.{j}.", f"layers.{layer_of[j]}.")]
        if "layer_norm" in tensor_name:
            return t[hidden]
        if "q_proj" in tensor_name or "k_proj" in tensor_name or "v_proj" in tensor_name:
            r = rows(j, "vo_dims" if "v_proj" in tensor_name else "qk_dims")
            out = t[r][:, hidden] if tensor_name.endswith("weight") else t[r]
            return out * math.sqrt(hd_student / hd) if "q_proj" in tensor_name else out
        if "out_proj" in tensor_name:
            return t[hidden][:, rows(j, "vo_dims")] if tensor_name.endswith("weight") else t[hidden]
        n = torch.tensor(plan["mlp"][j])
        if "fc1" in tensor_name:
            return t[n][:, hidden] if tensor_name.endswith("weight") else t[n]
        return t[hidden][:, n] if tensor_name.endswith("weight") else t[hidden]
    t = teacher_sd[key]
    if key.endswith("projection.weight") or "position_embedding" in key or "token_embedding" in key:
        return t[:, hidden]
    return t[hidden]


@pytest.mark.parametrize("importance", ["magnitude", "first"])
def test_every_tensor_is_the_teacher_slice_the_plan_records(teacher, importance):
    student, init = build_student(teacher, vision_depth=2, text_depth=3, vision_width=32, vision_heads=4,
                                  text_width=48, text_mlp_width=40, importance=importance)
    vc, tc = student.config.vision_config, student.config.text_config
    assert (vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers) == (32, 4, 64, 2)
    assert (tc.hidden_size, tc.num_attention_heads, tc.intermediate_size, tc.num_hidden_layers) == (48, 3, 40, 3)
    assert student.config.projection_dim == 24
    plans = student.config.distillation_init["width_plan"]
    tsd = teacher.state_dict()
    checked = 0
    for key, value in student.state_dict().items():
        if key == "logit_scale" or key.endswith("position_ids"):
            assert torch.equal(value, tsd[key])
            continue
        tower = "vision" if key.startswith(("vision_model", "visual_projection")) else "text"
        layer_of = init.vision_layers if tower == "vision" else init.text_layers
        hd_student = 32 // 4 if tower == "vision" else 48 // 3
        expected = _expected(tsd, plans[tower], layer_of, key, ".".join(key.rsplit(".", 2)[-2:]), hd_student)
        assert value.shape == expected.shape, key
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
        checked += 1
    # 16 tensors per layer (2 + 3 layers); vision: class, patch and position embeddings, 2 norms, projection (8);
    # text: token and position embeddings, final norm, projection (5)
    assert checked == 5 * 16 + 8 + 5
    plan = plans["vision"]
    assert len(plan["hidden"]) == 32 and all(len(h) == 4 for h in plan["heads"])
    assert all(len(d) == 8 for layer in plan["qk_dims"] for d in layer)  # 32 / 4 heads: 8 of each head's 16 dims
    if importance == "first":  # TinyCLIP's manual inheritance: the front of every tensor
        assert plan["hidden"] == list(range(32)) and plan["mlp"][0] == list(range(64))
        assert plan["qk_dims"][0][0] == list(range(8))


def test_a_narrow_student_is_a_stock_clip_model(teacher, tmp_path):
    student, _ = build_student(teacher, vision_width=32, text_width=32)
    student.save_pretrained(tmp_path)
    again = CLIPModel.from_pretrained(tmp_path)
    for x, y in zip(features(student, batch()), features(again, batch()), strict=True):
        torch.testing.assert_close(x, y)
    assert again.config.distillation_init["width_plan"]["text"]["importance"] == "magnitude"


def _zero_units(teacher: CLIPModel, heads=(1, 3), dims=range(8, 16), neurons=range(0, 128, 4)) -> None:
    """Make some heads, some dims of every head and some MLP neurons contribute nothing in every layer."""
    hd = WIDTH // HEADS
    with torch.no_grad():
        for tm in (teacher.vision_model, teacher.text_model):
            for layer in tm.encoder.layers:
                att = layer.self_attn
                dead = [h * hd + d for h in range(HEADS) for d in range(hd) if h in heads or d in dims]
                for lin in (att.q_proj, att.k_proj, att.v_proj):
                    lin.weight[dead] = 0
                    lin.bias[dead] = 0
                att.out_proj.weight[:, dead] = 0
                layer.mlp.fc1.weight[list(neurons)] = 0
                layer.mlp.fc1.bias[list(neurons)] = 0
                layer.mlp.fc2.weight[:, list(neurons)] = 0


def test_dropping_mlp_neurons_with_zero_weights_leaves_the_model_unchanged(teacher):
    with torch.no_grad():
        for tm in (teacher.vision_model, teacher.text_model):
            for layer in tm.encoder.layers:
                layer.mlp.fc1.weight[::4] = 0
                layer.mlp.fc1.bias[::4] = 0
                layer.mlp.fc2.weight[:, ::4] = 0
    student, _ = build_student(teacher, vision_layers=list(range(LAYERS)), text_layers=list(range(LAYERS)),
                               vision_mlp_width=96, text_mlp_width=96, allow_full_depth=True)
    assert student.config.distillation_init["width_plan"]["vision"]["mlp"][0] == [
        n for n in range(MLP) if n % 4]
    for x, y in zip(features(student, batch()), features(teacher, batch()), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_a_narrowed_layer_computes_the_teachers_restricted_layer(teacher, tower):
    """Heads and head dims whose weights are zero, inputs zero on the dropped channels: the narrow attention and MLP
    give exactly the teacher's outputs on the kept channels (this checks q/k/v/out and fc1/fc2 slice together, and
    the query scaling for smaller heads)."""
    _zero_units(teacher)
    student, _ = build_student(teacher, vision_layers=list(range(LAYERS)), text_layers=list(range(LAYERS)),
                               allow_full_depth=True, vision_width=16, vision_heads=2, vision_mlp_width=96,
                               text_width=16, text_heads=2, text_mlp_width=96)
    plan = student.config.distillation_init["width_plan"][tower]
    assert all(h == [0, 2] for h in plan["heads"]) and plan["qk_dims"][0] == [list(range(8))] * 2
    hidden = torch.tensor(plan["hidden"])
    x = torch.zeros(2, 5, WIDTH)
    x[..., hidden] = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    t_layers = getattr(teacher, f"{tower}_model").encoder.layers
    s_layers = getattr(student, f"{tower}_model").encoder.layers
    with torch.no_grad():
        for t_layer, s_layer in zip(t_layers, s_layers, strict=True):
            torch.testing.assert_close(s_layer.self_attn(x[..., hidden])[0], t_layer.self_attn(x)[0][..., hidden],
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s_layer.mlp(x[..., hidden]), t_layer.mlp(x)[..., hidden], rtol=1e-5, atol=1e-6)


def test_activation_importance_keeps_what_the_calibration_batch_uses(teacher):
    """A neuron with the largest weights that never fires (GELU of a very negative pre-activation) is kept by weight
    magnitude and dropped by activation magnitude."""
    with torch.no_grad():
        for layer in teacher.vision_model.encoder.layers:
            layer.mlp.fc1.weight[5] *= 0.01
            layer.mlp.fc1.bias[5] = -1e4
            layer.mlp.fc2.weight[:, 5] *= 1e4
    kwargs = dict(vision_mlp_width=64, vision_layers=[0, 2], text_layers=[0, 2])
    by_weight, _ = build_student(teacher, **kwargs)
    by_use, _ = build_student(teacher, importance="activation", calibration=batch(), **kwargs)
    assert 5 in by_weight.config.distillation_init["width_plan"]["vision"]["mlp"][0]
    assert 5 not in by_use.config.distillation_init["width_plan"]["vision"]["mlp"][0]
    with pytest.raises(ValueError, match="calibration batch"):
        build_student(teacher, importance="activation", **kwargs)


TEACHER = TowerShape(layers=4, width=64, heads=4, mlp=128)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"width": 80}, "student_vision_width=80: wider than the teacher's vision width 64"),
        ({"width": 42}, "student_vision_width=42: neither a multiple of the teacher's head size 16 nor divisible by"),
        ({"width": 32, "heads": 5}, "student_vision_heads=5: more than the teacher's 4 vision heads"),
        ({"width": 30, "heads": 4}, "student_vision_heads=4: student_vision_width=30 is not divisible by it"),
        ({"width": 64, "heads": 2}, "student_vision_heads=2: heads of 32 dims are larger than the teacher's 16"),
        ({"mlp": 256}, "student_vision_mlp_width=256: wider than the teacher's vision MLP width 128"),
        ({"width": 0}, "student_vision_width=0: must be an integer >= 1"),
    ],
)
def test_impossible_shapes_name_the_option(kwargs, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        resolve_width(TEACHER, "vision", **kwargs)


def test_default_heads_and_mlp_follow_the_teacher():
    assert resolve_width(TEACHER, "vision", width=32) == (32, 2, 64)  # head size 16 kept, MLP ratio 2 kept
    assert resolve_width(TEACHER, "vision", width=36, heads=4) == (36, 4, 72)
    assert resolve_width(TowerShape(6, 192, 3, 768), "text", width=96) == (96, 3, 384)  # the demo's 3 heads of 64


def test_the_recipe_builds_trains_and_exports_a_narrow_student(tmp_path):
    """The command line of the issue on the smoke teacher: a narrow, activation-ranked student is trained, saved as a
    stock CLIPModel, carries its plan and its shape on the card, and exports to open_clip."""
    from mmkd.interop.to_open_clip import export_open_clip
    from mmkd.reporting.cards import clip_student_card_data, render_clip_student_card
    from tests.conftest import REPO, load_recipe

    out = tmp_path / "narrow"
    load_recipe("clip_student").main([
        "--config", str(REPO / "recipes/configs/smoke.yaml"), "--output_dir", str(out), "--max_steps", "2",
        "--num_generated_examples", "16", "--per_device_train_batch_size", "8", "--report_to", "none",
        "--use_cpu", "true", "--student_vision_width", "32", "--student_text_width", "32",
        "--student_text_mlp_width", "48", "--student_width_importance", "activation", "--calibration_samples", "8"])
    student = CLIPModel.from_pretrained(out)
    vc, tc = student.config.vision_config, student.config.text_config
    assert (vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers) == (32, 1, 128, 2)
    assert (tc.hidden_size, tc.num_attention_heads, tc.intermediate_size) == (32, 1, 48)
    plan = student.config.distillation_init["width_plan"]
    assert plan["vision"]["importance"] == "activation" and len(plan["text"]["mlp"][0]) == 48
    card = str(render_clip_student_card(clip_student_card_data(out)))
    assert "vision: width 32, 1 heads, MLP width 128" in card and "`activation`" in card
    paths = export_open_clip(out, tmp_path / "open_clip")  # verified: open_clip's embeddings equal the CLIPModel's
    assert all(Path(p).is_file() for p in paths.values())
