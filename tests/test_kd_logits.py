"""Hinton KD on zero-shot class logits and the teacher-free virtual teacher: the maths by hand, the loss table, the
trainer's class embeddings and the recipe's class labels (mmkd.losses.logits)."""

from __future__ import annotations

import math

import pytest
import torch

from mmkd.checks import ConfigError
from mmkd.data import CLIPDistillationCollator
from mmkd.losses import LossInputs
from mmkd.losses.clip import clip_contrastive_loss
from mmkd.losses.logits import (
    ClassCELoss,
    ClassKDLoss,
    class_embeddings,
    hinton_kd_loss,
    virtual_teacher_loss,
    virtual_teacher_targets,
    zero_shot_logits,
)
from mmkd.students import build_student
from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer
from mmkd.trainers.class_logits import teacher_class_targets
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"


# -- the maths, by hand ---------------------------------------------------------------------------------------------
def test_hinton_kd_golden_values_by_hand():
    """Two classes, one image: s = (1, 0), t = (0, 1), y = 0, T = 2.
    CE = −log softmax(s)_0 = log(1 + e^−1) = 0.313262.
    softmax(t/2) = (0.377541, 0.622459); log softmax(s/2) = (−0.474077, −0.974077); log softmax(t/2) is the reverse.
    KL = 0.377541·(−0.974077 + 0.474077) + 0.622459·(−0.474077 + 0.974077) = 0.5·(0.622459 − 0.377541) = 0.122459;
    T²·KL = 0.489837."""
    ce, kd = hinton_kd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 2.0)
    assert ce.item() == pytest.approx(0.313262, abs=1e-6)
    assert kd.item() == pytest.approx(0.489837, abs=1e-6)
    # asymmetric logits tell KL(t ‖ s) from KL(s ‖ t): s = (2, 0), t = (0, 0), y = 1, T = 1.
    # CE = log(1 + e²) = 2.126928; softmax(s) = (0.880797, 0.119203), softmax(t) = (0.5, 0.5);
    # KL(t ‖ s) = 0.5·(log 0.5 − log 0.880797) + 0.5·(log 0.5 − log 0.119203) = 0.433781 (KL(s ‖ t) would be 0.325557)
    ce, kd = hinton_kd_loss(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), torch.tensor([1]), 1.0)
    assert ce.item() == pytest.approx(2.126928, abs=1e-6) and kd.item() == pytest.approx(0.433781, abs=1e-6)
    # identical logits: no soft loss at any temperature
    same = torch.tensor([[0.3, -1.2, 2.0]])
    assert hinton_kd_loss(same, same, torch.tensor([2]), 5.0)[1].item() == pytest.approx(0.0, abs=1e-7)


def test_the_t_squared_convention_keeps_the_soft_gradient_scale():
    """Hinton et al. section 2.1: for large T the soft gradient is (s_i − t_i) / (C · T²) with zero-mean logits;
    multiplied by T² it is (s_i − t_i) / C, independent of T."""
    s = torch.tensor([[1.0, -0.5, -0.5]], requires_grad=True)
    t = torch.tensor([[-1.0, 0.5, 0.5]])
    for temperature in (50.0, 200.0):
        _, kd = hinton_kd_loss(s, t, torch.tensor([0]), temperature)
        (grad,) = torch.autograd.grad(kd, s)
        assert torch.allclose(grad, (s - t).detach() / 3, atol=2e-3)


def test_zero_shot_logits_and_class_embeddings():
    prompts = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0]])  # 2 classes x 2 templates
    classes = class_embeddings(prompts, 2)
    # class 0: mean of (1, 0) and (0, 1), normalised -> (0.7071, 0.7071); class 1: (0, 1)
    assert torch.allclose(classes, torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]]), atol=1e-6)
    logits = zero_shot_logits(torch.tensor([[2.0, 0.0]]), classes, 10.0)
    assert torch.allclose(logits, torch.tensor([[10 * 2**-0.5, 0.0]]), atol=1e-5)
    with pytest.raises(ValueError, match="do not split into 3 classes"):
        class_embeddings(prompts, 3)


def test_virtual_teacher_golden_values_by_hand():
    labels = torch.tensor([0, 1])
    # a = 0.8 over K = 3: 0.8 on the class, 0.1 on each other
    assert torch.allclose(virtual_teacher_targets(labels, 3, 0.8).exp(),
                          torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]]), atol=1e-6)
    # T = 2 softens log p / 2: sqrt(0.8) = 0.894427, sqrt(0.1) = 0.316228, sum 1.526882 -> 0.585786, 0.207107
    assert torch.allclose(virtual_teacher_targets(labels, 3, 0.8, 2.0).exp()[0],
                          torch.tensor([0.585786, 0.207107, 0.207107]), atol=1e-6)
    # a = 1 is one-hot at every temperature
    assert torch.equal(virtual_teacher_targets(labels, 3, 1.0, 4.0).exp(), torch.eye(3)[:2])
    # 2 pairs, orthogonal embeddings, scale 1: logits [[1, 0], [0, 1]] in both directions; a = 0.9, T = 1:
    # KL = 0.9·log 0.9 + 0.1·log 0.1 − (0.9·log σ(1) + 0.1·log σ(−1)) with log σ(1) = −0.313262, log σ(−1) = −1.313262
    #    = −0.325083 + 0.413262 = 0.088179
    eye = torch.eye(2)
    assert virtual_teacher_loss(eye, eye, 1.0, 0.9).item() == pytest.approx(0.088179, abs=1e-6)


def test_virtual_teacher_at_a_one_and_t_one_is_clip_infonce():
    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    assert virtual_teacher_loss(image, text, 20.0, 1.0).item() == pytest.approx(
        clip_contrastive_loss(image, text, 20.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="a=1.5"):
        virtual_teacher_targets(torch.tensor([0]), 3, 1.5)


def test_modules_read_loss_inputs_and_weigh_their_parts():
    torch.manual_seed(0)
    inputs = LossInputs(student_image=torch.randn(4, 8), student_classes=torch.randn(3, 8),
                        class_labels=torch.tensor([0, 2, 1, 0]), logit_scale=torch.tensor(10.0),
                        teacher_image=torch.randn(4, 6), teacher_classes=torch.randn(3, 6),
                        teacher_logit_scale=torch.tensor(30.0))
    s = zero_shot_logits(inputs.student_image, inputs.student_classes, 10.0)
    t = zero_shot_logits(inputs.teacher_image, inputs.teacher_classes, 30.0)
    ce, kd = hinton_kd_loss(s, t, inputs.class_labels, 4.0)
    assert ClassCELoss(0.25)(inputs)["class_ce"].item() == pytest.approx(0.25 * ce.item(), rel=1e-6)
    assert ClassKDLoss(0.75, 4.0)(inputs)["class_kd"].item() == pytest.approx(0.75 * kd.item(), rel=1e-6)
    with pytest.raises(ValueError, match="requires class_labels"):
        ClassCELoss(1.0)(LossInputs(student_image=inputs.student_image, student_classes=inputs.student_classes,
                                    logit_scale=inputs.logit_scale))


# -- the loss table -------------------------------------------------------------------------------------------------
def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, report_to="none",
                  logging_steps=1, save_strategy="no", use_cpu=True, triplet_weight=0.0, image_distill_weight=0.0,
                  text_distill_weight=0.0, contrastive_weight=1.0)
    return CLIPDistillationConfig(**{**kwargs, **overrides})


def test_alpha_splits_the_class_term_and_alpha_zero_needs_no_teacher(tmp_path):
    args = config(tmp_path, class_kd_weight=2.0, class_kd_alpha=0.25)
    active = args.active_terms()
    assert active["class_ce"].weight_of(args) == 1.5 and active["class_kd"].weight_of(args) == 0.5
    assert args.needs_teacher and "text" in args.trained_towers()
    scratch = config(tmp_path, class_kd_weight=1.0, class_kd_alpha=0.0)
    assert "class_kd" not in scratch.active_terms() and not scratch.needs_teacher
    virtual = config(tmp_path, virtual_teacher_weight=1.0)
    assert "virtual_teacher" in virtual.active_terms() and not virtual.needs_teacher
    rows = {r["name"]: r for r in args.loss_card_rows()}
    assert "T = 4" in rows["class_kd"]["source"] and "hinton2015" in rows["class_kd"]["citation"]


@pytest.mark.parametrize("field, value, match", [
    ("class_kd_alpha", 1.5, "class_kd_alpha=1.5"),
    ("class_kd_temperature", 0.0, "class_kd_temperature=0.0"),
    ("class_templates", ["a photo of a {}."], "no {c} placeholder"),
    ("virtual_teacher_a", 0.0, "virtual_teacher_a=0.0"),
    ("class_templates", ["a {c} {}"], "only {c} may be in braces"),
])
def test_bad_class_options_are_refused(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, class_kd_weight=1.0, **{field: value})


# -- the trainer ----------------------------------------------------------------------------------------------------
def _trainer(teacher, shapes, args, **kwargs):
    student, _ = build_student(teacher.to_transformers())
    processor = teacher.transformers_processor()
    collator = CLIPDistillationCollator(processor, teacher.inputs(), class_column="label")
    return CLIPDistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=shapes,
                                   data_collator=collator, processing_class=processor,
                                   class_names=shapes.features["label"].names, **kwargs)


def test_trainer_encodes_the_class_prompts_each_step_with_gradients(tmp_path, open_clip_teacher, shapes):
    args = config(tmp_path, class_kd_weight=1.0, class_kd_alpha=0.5, contrastive_weight=0.0,
                  class_templates=["a photo of a {c}.", "a drawing of a {c}."])
    trainer = _trainer(open_clip_teacher, shapes, args)
    names = shapes.features["label"].names
    assert trainer.class_prompts["input_ids"].shape[0] == 2 * len(names)
    # the teacher's class embeddings: its own text tower on the same prompts, normalised means
    expected = teacher_class_targets(open_clip_teacher, names, args.class_templates)
    assert torch.allclose(trainer.teacher_classes.embeddings, expected.embeddings, atol=1e-6)
    assert trainer.teacher_classes.logit_scale.item() == pytest.approx(open_clip_teacher.logit_scale.item())
    batch = trainer.data_collator([shapes[i] for i in range(8)])
    assert batch["class_labels"].tolist() == shapes["label"][:8]
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    text_grads = [p.grad for n, p in trainer.model.text_model.named_parameters() if p.grad is not None]
    assert text_grads and any(g.abs().sum() > 0 for g in text_grads)  # only the class prompts reach the text tower
    assert trainer.model.logit_scale.grad is not None  # the student's scale is its zero-shot scale


def test_class_embeddings_follow_the_training_student(tmp_path, open_clip_teacher, shapes):
    """Encoded every step: after one optimiser step the student's class embeddings are its new text tower's."""
    args = config(tmp_path, class_kd_weight=1.0, class_kd_alpha=0.0, contrastive_weight=0.0, max_steps=1,
                  learning_rate=1e-2, warmup_steps=0)
    trainer = _trainer(open_clip_teacher, shapes, args)
    batch = trainer.data_collator([shapes[i] for i in range(8)])
    with torch.no_grad():
        before, _ = trainer.student_inputs(trainer.model, batch)
    trainer.train()
    with torch.no_grad():
        after, _ = trainer.student_inputs(trainer.model, batch)
        direct = trainer.model.get_text_features(**trainer.class_prompts).pooler_output
    assert not torch.allclose(before["student_classes"], after["student_classes"], atol=1e-4)
    from mmkd.losses.logits import class_embeddings as embed

    assert torch.allclose(after["student_classes"], embed(direct, len(trainer.class_names)), atol=1e-6)


def test_cached_teacher_gives_the_live_class_kd_loss(tmp_path, open_clip_teacher, shapes):
    args = config(tmp_path, class_kd_weight=1.0, class_kd_alpha=1.0, contrastive_weight=0.0)
    live = _trainer(open_clip_teacher, shapes, args)
    batch = live.data_collator([shapes[i] for i in range(8)])
    with torch.no_grad():
        expected = live.compute_loss(live.model, batch)
    cached = {**batch, "teacher_image_embeds": open_clip_teacher(pixel_values=batch["pixel_values"]).image_embeds}
    offline = CLIPDistillationTrainer(model=live.model, teacher=None, args=args, train_dataset=shapes,
                                      data_collator=live.data_collator, processing_class=live.processing_class,
                                      class_names=shapes.features["label"].names,
                                      teacher_classes=live.teacher_classes)
    with torch.no_grad():
        assert offline.compute_loss(offline.model, cached).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="pass teacher_classes"):
        CLIPDistillationTrainer(model=live.model, teacher=None, args=args, train_dataset=shapes,
                                data_collator=live.data_collator, processing_class=live.processing_class,
                                class_names=["a", "b"])


def test_trainer_refuses_class_terms_without_class_names(tmp_path, open_clip_teacher, shapes):
    student, _ = build_student(open_clip_teacher.to_transformers())
    with pytest.raises(ValueError, match="need class_names"):
        CLIPDistillationTrainer(model=student, teacher=open_clip_teacher, train_dataset=shapes,
                                args=config(tmp_path, class_kd_weight=1.0),
                                processing_class=open_clip_teacher.transformers_processor())


# -- the recipe -----------------------------------------------------------------------------------------------------
def test_recipe_trains_with_the_class_term_and_logs_both_parts(tmp_path):
    recipe = load_recipe("clip_student")
    out = tmp_path / "run"
    summary = recipe.main(["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "48",
                           "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to",
                           "none", "--use_cpu", "true", "--class_kd_weight", "1", "--class_kd_alpha", "0.5",
                           "--virtual_teacher_weight", "0.5"])
    assert {r["name"] for r in summary["losses"]} >= {"class_ce", "class_kd", "virtual_teacher"}
    import json

    logged = json.loads((out / "trainer_state.json").read_text())["log_history"][0]
    assert {"loss_class_ce", "loss_class_kd", "loss_virtual_teacher"} <= logged.keys()
    assert all(math.isfinite(logged[k]) for k in ("loss_class_ce", "loss_class_kd", "loss_virtual_teacher"))


def test_recipe_trains_the_class_terms_from_the_teacher_cache(tmp_path):
    recipe = load_recipe("clip_student")
    argv = ["--config", str(SMOKE), "--num_generated_examples", "48", "--max_steps", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--class_kd_weight", "1",
            "--class_kd_alpha", "1", "--triplet_weight", "0", "--image_distill_weight", "0",
            "--text_distill_weight", "0", "--affinity_weight", "0", "--contrastive_weight", "0"]
    live = recipe.main([*argv, "--output_dir", str(tmp_path / "live")])
    cached = recipe.main([*argv, "--output_dir", str(tmp_path / "cached"), "--teacher_cache_dir", str(tmp_path / "c")])
    assert live["teacher_embeddings"] == "live" and cached["teacher_embeddings"] == "cached"
    import json

    def first_loss(run):
        return json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"][0]["loss_class_kd"]

    assert first_loss("cached") == pytest.approx(first_loss("live"), rel=1e-4)  # the same targets, without the teacher


def test_recipe_refuses_a_missing_or_unnamed_label_column(tmp_path, capsys):
    import datasets

    recipe = load_recipe("clip_student")
    folder = tmp_path / "plain"
    from mmkd.data import shapes_dataset

    shapes_dataset(8, image_size=32).cast_column("label", datasets.Value("int64")).save_to_disk(str(folder))
    common = ["--config", str(SMOKE), "--output_dir", str(tmp_path / "o"), "--class_kd_weight", "1",
              "--report_to", "none"]
    for extra, expected in ((["--dataset_name", str(folder)], "label_column=label: not a ClassLabel column"),
                            (["--label_column", "kind"], "label_column=kind: dataset 'shapes' has no such column")):
        with pytest.raises(SystemExit) as info:
            recipe.main([*common, *extra])
        assert info.value.code == 2 and expected in capsys.readouterr().err


def test_image_folder_with_class_subfolders_is_a_labelled_captioned_set(tmp_path):
    from PIL import Image

    from mmkd.data.sources import DataArguments, class_names, load_train_dataset

    for name, colour in (("red_car", (200, 0, 0)), ("blue_boat", (0, 0, 200))):  # folder names, underscores
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "images" / name / f"{i}.png")
    data_args = DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path / "images"))
    ds = load_train_dataset(data_args)
    names = class_names(ds, data_args)
    assert sorted(names) == ["blue boat", "red car"] and len(ds) == 6  # the captions' and the prompts' names
    for row in ds:
        assert row["text"] == f"a photo of a {names[row['label']]}."
    capped = load_train_dataset(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path / "images"),
                                              max_train_samples=4))
    assert set(capped["label"]) == {0, 1}  # a cap keeps every class (the files come class by class)
    with pytest.raises(ConfigError, match="needs --data_dir"):
        load_train_dataset(DataArguments(dataset_name="imagefolder"))
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "x.png")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_train_dataset(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path / "empty")))
