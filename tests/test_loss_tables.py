"""The trainers' loss tables: validation, the teacher decision, DDP's unused-parameter search and the card rows all
follow from the entries of CLIP_LOSS_TERMS / MATCH_LOSS_TERMS."""

from __future__ import annotations

import pytest

from mmkd.losses.clip import (
    AffinityDistillationLoss,
    CLIPContrastiveLoss,
    EmbeddingDistillationLoss,
    TripletLoss,
)
from mmkd.losses.match import FeatureDistillationLoss, HardLabelLoss, SoftLogitLoss
from mmkd.reporting.cards import card_losses
from mmkd.trainers import (
    CLIP_LOSS_TERMS,
    MATCH_LOSS_TERMS,
    CLIPDistillationConfig,
    LossTerm,
    MatchDistillationConfig,
)

OFF = dict(triplet_weight=0.0, image_distill_weight=0.0, text_distill_weight=0.0, contrastive_weight=0.0,
           affinity_weight=0.0)


def clip(tmp_path, **weights) -> CLIPDistillationConfig:
    return CLIPDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{**OFF, **weights})


def match(tmp_path, **options) -> MatchDistillationConfig:
    return MatchDistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)


@pytest.mark.parametrize(
    "weights, needs_teacher, find_unused",
    [
        ({"triplet_weight": 1.0}, False, False),  # student-only, both towers
        ({"contrastive_weight": 1.0}, False, False),
        ({"image_distill_weight": 1.0}, True, True),  # the text tower gets no gradient: DDP must search
        ({"text_distill_weight": 1.0}, True, True),
        ({"image_distill_weight": 1.0, "text_distill_weight": 1.0}, True, False),
        ({"affinity_weight": 1.0}, True, False),
        ({"image_distill_weight": 1.0, "contrastive_weight": 0.5}, True, False),
    ],
)
def test_clip_teacher_and_ddp_decisions_follow_the_table(tmp_path, weights, needs_teacher, find_unused):
    cfg = clip(tmp_path, **weights)
    assert cfg.needs_teacher is needs_teacher
    assert cfg.ddp_find_unused_parameters is find_unused
    assert list(cfg.active_terms()) == [name for name in CLIP_LOSS_TERMS if CLIP_LOSS_TERMS[name].weight_of(cfg) > 0]


def test_an_explicit_ddp_flag_is_kept(tmp_path):
    assert clip(tmp_path, image_distill_weight=1.0, ddp_find_unused_parameters=False).ddp_find_unused_parameters is False


def test_clip_build_loss_has_one_module_per_active_term_in_table_order(tmp_path):
    cfg = clip(tmp_path, triplet_weight=0.5, text_distill_weight=2.0, contrastive_weight=1.0, affinity_weight=0.25)
    modules = list(cfg.build_loss().losses)
    assert [type(m) for m in modules] == [TripletLoss, EmbeddingDistillationLoss, CLIPContrastiveLoss,
                                          AffinityDistillationLoss]
    assert modules[1].tower == "text" and modules[1].weight == 2.0 and modules[3].weight == 0.25
    assert cfg.needed_inputs() == {"student_image", "student_text", "teacher_image", "teacher_text", "logit_scale"}


def test_every_weight_of_the_table_is_checked(tmp_path):
    # the class-logit terms weigh class_kd_weight by 1 − α and α: the field itself is checked
    fields = {term.field for term in CLIP_LOSS_TERMS.values()}
    assert "class_kd_weight" in fields
    for field in fields:
        with pytest.raises(ValueError, match=rf"{field}=-0.5: must be >= 0"):
            clip(tmp_path, **{"contrastive_weight": 1.0, field: -0.5})


def test_card_rows_come_from_the_table(tmp_path):
    cfg = clip(tmp_path, triplet_weight=1.0, image_distill_weight=0.5, affinity_weight=2.0)
    rows = cfg.loss_card_rows()
    assert [r["name"] for r in rows] == ["triplet", "image_distill", "affinity"]
    assert rows[0]["terms"] == ["triplet_i2t", "triplet_t2i"] and rows[0]["weight"] == 1.0
    assert rows[1]["terms"] == ["image_mse", "image_cosine"] and rows[1]["weight"] == 0.5
    assert "Yang et al., 2024" in rows[2]["source"] and "yang2024clipkd" in rows[2]["citation"]
    table, citations = card_losses(rows)
    assert table[1]["terms"] == "`image_mse`, `image_cosine`"
    assert citations.count("@inproceedings{schroff2015facenet") == 1 and "hinton2015distilling" in citations


@pytest.mark.parametrize(
    "options, active, needs_teacher",
    [
        ({"alpha": 0.0}, ["hard"], False),  # the teacher stage and the baseline
        ({"alpha": 0.5}, ["hard", "soft"], True),
        ({"alpha": 1.0}, ["soft"], True),
        ({"alpha": 0.0, "feature_weight": 1.0}, ["hard", "feature"], True),
        ({"alpha": 0.5, "feature_weight": 1.0}, ["hard", "soft", "feature"], True),
    ],
)
def test_match_terms_follow_alpha_and_the_feature_weight(tmp_path, options, active, needs_teacher):
    cfg = match(tmp_path, **options)
    assert list(cfg.active_terms()) == active
    assert cfg.needs_teacher is needs_teacher
    assert cfg.ddp_find_unused_parameters is False  # every term trains both towers of the matcher
    kinds = {"hard": HardLabelLoss, "soft": SoftLogitLoss, "feature": FeatureDistillationLoss}
    assert [type(m) for m in cfg.build_loss().losses] == [kinds[name] for name in active]


def test_match_card_rows_name_every_form_and_the_scaled_weight(tmp_path):
    kl = match(tmp_path, alpha=0.25, temperature=2.0, distill_form="kl_two_class", t2_scaling=True)
    hard, soft = kl.loss_card_rows()
    assert hard["terms"] == ["hard"] and hard["weight"] == 0.75
    # The card describes the form (it used to look the form up under a misspelt key and print the raw name).
    assert soft["source"].startswith("KL between the two-class softmaxes of [0, s/T] and [0, t/T], T = 2")
    assert soft["weight"] == "0.25 × T² = 1"
    assert "sigmoid_bce" not in soft["source"] and "kl_two_class" not in soft["source"]
    bce = match(tmp_path, alpha=0.5).loss_card_rows()[1]
    assert bce["source"].startswith("BCE between σ(s/T) and the teacher's σ(t/T), T = 3") and bce["weight"] == "0.5"
    assert set(MATCH_LOSS_TERMS) == {"hard", "soft", "feature"}


def test_a_loss_term_must_name_known_inputs():
    with pytest.raises(ValueError, match="unknown inputs \\['teacher_attention'\\]"):
        LossTerm(weight="w", build=lambda a: None, needs=frozenset({"teacher_attention"}))
