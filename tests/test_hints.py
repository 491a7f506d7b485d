"""FitNets hidden-state hints: the distance by hand, the layer map, projectors that train with the student, are
checkpointed (a resume is exact) and are never in the saved student."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPModel

from mmkd.losses import LossInputs
from mmkd.losses.features import HintLoss, hint_distance, parse_layer_weights
from mmkd.students import build_student
from mmkd.teachers.base import pooled_index
from mmkd.trainers.hints import (
    hint_layer_map,
    parse_hint_layers,
    select_tokens,
)
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"


def test_hint_distances_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 tokens, 2)
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]) + torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # token 0: ((0)^2 + (-1)^2) / 2 = 0.5; token 1: (0 + 4) / 2 = 2
    assert hint_distance(s, t, "mse").item() == pytest.approx(1.25)
    assert hint_distance(s, t, "mse", mask=torch.tensor([[1, 0]])).item() == pytest.approx(0.5)  # padding left out
    # cosine: token 0: cos((1,0),(1,1)) = 1/sqrt2; token 1: t is zero -> cos 0
    assert hint_distance(s, t, "cosine").item() == pytest.approx(((1 - 2 ** -0.5) + 1) / 2, abs=1e-6)
    assert hint_distance(torch.ones(3, 4), 2 * torch.ones(3, 4), "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="hint shapes differ"):
        hint_distance(torch.ones(2, 3), torch.ones(2, 4))


def test_the_hint_term_weights_layers_and_towers():
    one, two = torch.ones(2, 4), torch.zeros(2, 4)
    inputs = LossInputs(student_image_hints=[one, one], teacher_image_hints=[two, one],  # distances 1 and 0
                        student_text_hints=[one], teacher_text_hints=[two])
    terms = HintLoss(weight=2.0)(inputs)
    assert terms["image_hint"].item() == pytest.approx(2.0 * (1 + 0) / 2)
    assert terms["text_hint"].item() == pytest.approx(2.0)
    inputs.student_text_hints, inputs.teacher_text_hints = [one, one], [two, two]
    terms = HintLoss(weight=2.0, layer_weights="3,1")(inputs)  # earlier layers weigh more
    assert terms["image_hint"].item() == pytest.approx(2.0 * (3 * 1 + 1 * 0) / 4)
    assert terms["text_hint"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="hint_layer_weights='1': 1 weights for 2 hinted layers"):
        HintLoss(layer_weights="1")(inputs)


def test_layer_maps_and_token_selection():
    init = {"vision_layers": [0, 2, 4], "text_layers": []}
    assert hint_layer_map(init, "vision", 3, 6) == [0, 2, 4]  # the layer each was copied from
    assert hint_layer_map(init, "text", 3, 6) == [1, 3, 5]  # random init: proportional, last with last
    assert parse_hint_layers("last", 3) == [2] and parse_hint_layers("all", 3) == [0, 1, 2]
    assert parse_hint_layers("2,0", 3) == [2, 0]  # the order given, which hint_layer_weights follow
    for bad in ("3", "0,0", "x"):
        with pytest.raises(ValueError, match="hint_layers"):
            parse_hint_layers(bad, 3)
    assert parse_layer_weights("0.5,1", 2) == [0.5, 1.0] and parse_layer_weights(None, 2) is None
    for bad in ("1", "0,0", "a,b", "-1,2", "inf,1", "nan,1"):
        with pytest.raises(ValueError, match="hint_layer_weights"):
            parse_layer_weights(bad, 2)
    ids = torch.tensor([[49406, 5, 49407, 0], [49406, 5, 6, 49407]])
    assert pooled_index(ids, 49407).tolist() == [2, 3] and pooled_index(ids, None).tolist() == [2, 3]
    states = torch.arange(2 * 4 * 1.0).view(2, 4, 1)
    assert select_tokens(states, "pooled", torch.tensor([2, 3])).flatten().tolist() == [2.0, 7.0]
    assert select_tokens(states, "pooled").flatten().tolist() == [0.0, 4.0]  # the class token
    assert select_tokens(states, "all", length=2).shape == (2, 2, 1)


def _run(out, *extra, steps=4):
    return load_recipe("clip_student").main([
        "--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "48",
        "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--save_steps", "2", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0", "--hint_weight", "1",
        "--hint_layers", "all", "--student_vision_width", "32", *extra])


def test_projectors_train_are_checkpointed_and_never_saved_in_the_student(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        _run(out, "--triplet_weight", "0", "--image_distill_weight", "0", "--text_distill_weight", "0")
    ckpt = load_file(out / "checkpoint-4" / "model.safetensors")
    first = load_file(out / "checkpoint-2" / "model.safetensors")
    projector_keys = sorted(k for k in ckpt if k.startswith("mmkd_projectors."))
    # the vision tower is narrower (32 vs 64): one projector per hinted layer; the text tower is not: identities
    assert projector_keys == ["mmkd_projectors.image_0.weight", "mmkd_projectors.image_1.weight"]
    assert ckpt["mmkd_projectors.image_0.weight"].shape == (64, 32)
    assert all(not torch.equal(first[k], ckpt[k]) for k in projector_keys)  # trained with the student
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mmkd" in k]  # the student is stock
    student = CLIPModel.from_pretrained(out)
    assert student.config.vision_config.hidden_size == 32
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert {"loss_image_hint", "loss_text_hint"} <= set(log[0])
    # hints are the only term here: every hinted student layer changed
    changed = {k for k, v in first.items() if not k.startswith("mmkd") and not torch.equal(v, ckpt[k])}
    for tower in ("vision_model", "text_model"):
        for layer in (0, 1):
            assert f"{tower}.encoder.layers.{layer}.mlp.fc1.weight" in changed


def test_a_resume_with_projectors_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--hint_tokens", "pooled", "--projector", "mlp", "--hint_loss", "cosine")
    _run(straight, *extra)
    _run(resumed, *extra, steps=2)
    _run(resumed, *extra, "--resume_from_checkpoint", "latest")
    a, b = (load_file(p / "checkpoint-4" / "model.safetensors") for p in (straight, resumed))
    assert a.keys() == b.keys() and any(k.startswith("mmkd_projectors.text_1") for k in a)  # mlp: even at equal width
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_hints_refuse_a_teacher_cache(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        load_recipe("clip_student").main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"), "--use_cpu",
                                          "true", "--hint_weight", "1", "--teacher_cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: teacher_cache_dir=") and "hidden states" in err
    with pytest.raises(SystemExit):
        load_recipe("clip_student").main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"), "--use_cpu",
                                          "true", "--hint_weight", "1", "--hint_layers", "5"])
    assert "hint_layers='5'" in capsys.readouterr().err


def test_two_process_launch_with_projectors(tmp_path):
    """DDP syncs the projectors: both ranks end with the same projector weights in the checkpoint."""
    out = tmp_path / "ddp"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "recipes/clip_student.py", "--config", str(SMOKE), "--output_dir",
           str(out), "--max_steps", "2", "--save_steps", "2", "--report_to", "none", "--hint_weight", "1",
           "--student_vision_width", "32"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "training_summary.json").read_text())["world_size"] == 2
    ckpt = load_file(out / "checkpoint-2" / "model.safetensors")
    assert "mmkd_projectors.image_1.weight" in ckpt
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mmkd" in k]


def test_simkd_term_by_hand():
    from mmkd.losses.features import SimKDLoss

    inputs = LossInputs(student_image_feature=torch.tensor([[1.0, 3.0]]), teacher_image_feature=torch.tensor([[0.0, 1.0]]),
                        student_text_feature=torch.zeros(1, 2), teacher_text_feature=torch.zeros(1, 2))
    terms = SimKDLoss(weight=0.5)(inputs)
    assert terms["image_simkd"].item() == pytest.approx(0.5 * (1 + 4) / 2) and terms["text_simkd"].item() == 0.0


@pytest.mark.parametrize("backend", ["open_clip", "transformers"])
def test_simkd_reuses_the_teacher_head_and_folds_it_into_a_stock_student(tmp_path, backend, open_clip_teacher,
                                                                         hf_teacher, shapes):
    """Trained through projector + the teacher's frozen projection; saved with the two folded into the student's
    own projections: the stock CLIPModel gives the trained student's embeddings (1e-5)."""
    from tests.test_trainer import make_config, make_trainer

    teacher = open_clip_teacher if backend == "open_clip" else hf_teacher
    student, _ = build_student(teacher.to_transformers(), vision_width=16, text_width=16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(teacher, shapes, make_config(tmp_path, simkd_weight=1.0, image_distill_weight=0.5), student)
    untrained = {k: v.clone() for k, v in trainer.model.mmkd_projectors.state_dict().items()}
    trainer.train()
    heads = trainer.model.mmkd_projectors
    assert all(not torch.equal(untrained[k], v) for k, v in heads.state_dict().items())  # both heads trained
    changed = [k for k, v in student.state_dict().items() if not k.startswith("mmkd") and not torch.equal(before[k], v)]
    assert "vision_model.encoder.layers.1.mlp.fc2.weight" in changed and "text_model.embeddings.token_embedding.weight" in changed
    assert heads["image_head"].weight.shape == (teacher.hidden_widths()["vision"], 16)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trained, _ = trainer.student_inputs(trainer.model, batch)
    assert not student.visual_projection.weight.requires_grad  # not trained: the fold of projector x teacher's
    trainer.save_model(str(tmp_path / "saved"))
    saved = CLIPModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        image = saved.get_image_features(pixel_values=batch["pixel_values"])
        text = saved.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for got, want in ((image, trained["student_image"]), (text, trained["student_text"])):
        got = got.pooler_output if hasattr(got, "pooler_output") else got
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mmkd" in k]
    log = trainer.state.log_history[0]
    assert {"loss_image_simkd", "loss_text_simkd"} <= set(log)


def test_attention_kl_by_hand():
    from mmkd.losses.features import attention_kl

    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # (1 batch, 1 head, 2 rows, 2 keys)
    s = torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]])
    row0 = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert attention_kl(t, s).item() == pytest.approx(row0.item() / 2, abs=1e-6)  # row 1 agrees: KL 0
    assert attention_kl(t, s, row_mask=torch.tensor([[1, 0]])).item() == pytest.approx(row0.item(), abs=1e-6)
    two_heads = torch.cat([t, t], dim=1)  # head counts differ: both sides averaged over heads
    assert attention_kl(two_heads, s).item() == pytest.approx(row0.item() / 2, abs=1e-6)


def test_recomputed_attention_is_what_each_backend_computes(open_clip_teacher, hf_teacher):
    """attention_probs from a layer's input and weights equals the layer's own attention: transformers' eager
    attention (causal + padding for text) and open_clip's MultiheadAttention."""
    from mmkd.losses.features import attention_probs

    torch.manual_seed(0)
    ids = torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 320, 1929, 539, 49407]])
    mask = (ids != 0).long()
    model = hf_teacher.model
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns the attention weights
    try:
        out = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation(original)
    for layer in range(2):
        mine = attention_probs(out.hidden_states[layer], *hf_teacher.attention_weights("text", layer), causal=True)
        real = out.attentions[layer]
        keep = mask.bool()  # rows of real tokens (padded rows differ only where both mask everything)
        torch.testing.assert_close(mine[keep[:, None, :].expand(-1, real.shape[1], -1)],
                                   real[keep[:, None, :].expand(-1, real.shape[1], -1)], rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, 64)
    block = open_clip_teacher.model.visual.transformer.resblocks[1]
    h = block.ln_1(x)
    _, real = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
    mine = attention_probs(x, *open_clip_teacher.attention_weights("image", 1))
    torch.testing.assert_close(mine, real, rtol=1e-5, atol=1e-6)


def test_attention_transfer_trains_and_logs(tmp_path):
    out = tmp_path / "att"
    load_recipe("clip_student").main([
        "--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "16",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
        "--use_cpu", "true", "--attention_weight", "1", "--attention_layers", "all", "--student_text_heads", "1",
        "--student_text_width", "32"])
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert log[0]["loss_image_attention"] > 0 and log[0]["loss_text_attention"] > 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mmkd" in k]


def test_simkd_starts_where_weight_inheritance_started(open_clip_teacher, shapes, tmp_path):
    """The projector selects the kept channels, so teacher projection @ P is the inherited (sliced) projection."""
    from tests.test_trainer import make_config, make_trainer

    student, _ = build_student(open_clip_teacher.to_transformers(), vision_width=32)
    inherited = student.visual_projection.weight.clone()
    trainer = make_trainer(open_clip_teacher, shapes, make_config(tmp_path, simkd_weight=1.0), student)
    head = trainer.model.mmkd_projectors["image_head"].weight
    torch.testing.assert_close(open_clip_teacher.projection("image") @ head, inherited)
    text_head = trainer.model.mmkd_projectors["text_head"].weight
    assert torch.equal(text_head, torch.eye(text_head.shape[0]))  # equal width: the identity


def test_simkd_keeps_the_student_projections_folded_during_training(open_clip_teacher, shapes, tmp_path):
    """After every step (so at every checkpoint and evaluation) the stock projection is projector x teacher's."""
    from tests.test_trainer import make_config, make_trainer

    student, _ = build_student(open_clip_teacher.to_transformers(), vision_width=32)
    trainer = make_trainer(open_clip_teacher, shapes, make_config(tmp_path, simkd_weight=1.0, max_steps=2), student)
    trainer.train()
    head = trainer.model.mmkd_projectors["image_head"].weight
    torch.testing.assert_close(student.visual_projection.weight, open_clip_teacher.projection("image") @ head)


def test_hint_layers_keep_the_order_their_weights_follow(open_clip_teacher, shapes, tmp_path):
    from tests.test_trainer import make_config, make_trainer

    student, _ = build_student(open_clip_teacher.to_transformers(), vision_depth=2, text_depth=2)
    trainer = make_trainer(open_clip_teacher, shapes, make_config(tmp_path, hint_weight=1.0, hint_layers="1,0",
                                                                   hint_layer_weights="1,0.1"), student)
    # student layer 1 (copied from teacher layer 2) first, with weight 1; layer 0 with 0.1
    assert trainer.hint_pairs["image"] == [(1, 2), (0, 0)]


def test_the_card_cites_each_feature_term(tmp_path):
    from tests.test_trainer import make_config

    rows = {r["name"]: r for r in make_config(tmp_path, hint_weight=1.0, attention_weight=0.5,
                                               simkd_weight=0.2).loss_card_rows()}
    assert "romero2015fitnets" in rows["hint"]["citation"] and rows["hint"]["terms"] == ["image_hint", "text_hint"]
    assert "wang2020minilm" in rows["attention"]["citation"] and rows["attention"]["weight"] == 0.5
    assert "chen2022simkd" in rows["simkd"]["citation"] and rows["simkd"]["terms"] == ["image_simkd", "text_simkd"]
