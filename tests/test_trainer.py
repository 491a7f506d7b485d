"""CLIPDistillationTrainer: training changes the student only, logs every term, accumulates and resumes correctly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from mmkd.data import CLIPDistillationCollator
from mmkd.students import build_student
from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer


def make_config(tmp_path, **overrides) -> CLIPDistillationConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-3,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        contrastive_weight=0.5,
        affinity_weight=0.5,
    )
    kwargs.update(overrides)
    return CLIPDistillationConfig(**kwargs)


def make_trainer(teacher, shapes, args, student=None):
    if student is None:
        student, _ = build_student(teacher.to_transformers())
    processor = teacher.transformers_processor()
    collator = CLIPDistillationCollator(processor, teacher.inputs())
    return CLIPDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=shapes,
        data_collator=collator,
        processing_class=processor,
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("triplet_negatives", "semi-hard", "'semi-hard'"),
        ("distill_loss", "l1", "'l1'"),
        ("student_init", "alternate", "'alternate'"),
        ("teacher_backend", "onnx", "'onnx'"),
        ("affinity_temperature", 0.0, "affinity_temperature=0.0"),
        ("triplet_weight", -1.0, "triplet_weight=-1.0"),
        ("student_vision_layers", 0, "student_vision_layers=0"),
        ("teacher_dtype", "fp8", "teacher_dtype='fp8'"),
        ("teacher_dtype", "float16", "teacher_dtype='float16': float16 runs only on a GPU"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **{field: value})


def test_config_rejects_all_zero_weights(tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        make_config(
            tmp_path, triplet_weight=0, image_distill_weight=0, text_distill_weight=0, contrastive_weight=0,
            affinity_weight=0,
        )


def test_training_changes_every_student_parameter_and_no_teacher_parameter(tmp_path, teacher, shapes):
    teacher_before = copy.deepcopy(teacher.state_dict())
    trainer = make_trainer(teacher, shapes, make_config(tmp_path))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not teacher.training
    logged = {k for entry in trainer.state.log_history for k in entry}
    for term in ("triplet_i2t", "triplet_t2i", "image_mse", "image_cosine", "text_mse", "text_cosine",
                 "contrastive", "affinity"):
        assert f"loss_{term}" in logged
    assert trainer.gathered_batch_size == 8


def test_a_bfloat16_teacher_meets_a_float32_student_in_float32(tmp_path, open_clip_teacher, shapes):
    """teacher_dtype casts the frozen teacher's weights (not the student's); its outputs are close to the float32
    teacher's and the losses (mmkd.losses.checks) read them in float32 next to the float32 student's."""
    teacher = copy.deepcopy(open_clip_teacher)
    student, _ = build_student(teacher.to_transformers())
    trainer = make_trainer(teacher, shapes, make_config(tmp_path, teacher_dtype="bfloat16"), student=student)
    assert trainer.teacher.dtype == torch.bfloat16 and trainer.model.dtype == torch.float32
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    got = trainer.teacher_inputs(batch)
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    reference = make_trainer(open_clip_teacher, shapes, make_config(tmp_path)).teacher_inputs(batch)
    for name, value in got.items():
        torch.testing.assert_close(value.float(), reference[name], atol=0.05, rtol=0.05)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_logit_scale_is_frozen_without_the_contrastive_term(tmp_path, open_clip_teacher, shapes):
    trainer = make_trainer(open_clip_teacher, shapes, make_config(tmp_path, contrastive_weight=0.0))
    before = trainer.model.logit_scale.detach().clone()
    trainer.train()
    assert not trainer.model.logit_scale.requires_grad
    assert torch.equal(trainer.model.logit_scale, before)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, open_clip_teacher, shapes):
    """One step of 2 x 4 accumulated equals one step of 8 for terms that are means over examples."""
    common = dict(
        max_steps=1, optim="sgd", learning_rate=0.5, warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        triplet_weight=0.0, contrastive_weight=0.0, affinity_weight=0.0, lr_scheduler_type="constant",
    )
    student, _ = build_student(open_clip_teacher.to_transformers())
    a = make_trainer(open_clip_teacher, shapes, make_config(tmp_path / "a", per_device_train_batch_size=8, **common),
                     student=copy.deepcopy(student))
    b = make_trainer(open_clip_teacher, shapes, make_config(tmp_path / "b", per_device_train_batch_size=4,
                                                             gradient_accumulation_steps=2, **common),
                     student=copy.deepcopy(student))
    a.train()
    b.train()
    moved = sum((pa - p0).abs().sum() for pa, p0 in zip(a.model.parameters(), student.parameters(), strict=True))
    assert moved > 0
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=n)
    la = [e["loss"] for e in a.state.log_history if "loss" in e]
    lb = [e["loss"] for e in b.state.log_history if "loss" in e]
    assert la == pytest.approx(lb, rel=1e-4)


def test_cached_teacher_embeddings_skip_the_teacher(tmp_path, open_clip_teacher, shapes):
    """Columns teacher_image_embeds / teacher_text_embeds are used as they are; the teacher never runs."""
    processor = open_clip_teacher.transformers_processor()
    inputs = open_clip_teacher.inputs()
    rows = shapes.select(range(16))
    pixels = inputs.images(rows["image"])
    ids = inputs.texts(rows["text"])
    cached = rows.add_column("teacher_image_embeds", open_clip_teacher.encode_image(pixels).tolist())
    cached = cached.add_column("teacher_text_embeds", open_clip_teacher.encode_text(**ids).tolist())
    collator = CLIPDistillationCollator(processor, inputs)
    batch = collator([cached[i] for i in range(4)])
    assert "teacher_image_embeds" in batch and "teacher_pixel_values" not in batch
    student, _ = build_student(open_clip_teacher.to_transformers())
    trainer = CLIPDistillationTrainer(
        model=student, teacher=None, args=make_config(tmp_path, max_steps=2), train_dataset=cached,
        data_collator=collator, processing_class=processor,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    no_cache = CLIPDistillationTrainer(
        model=copy.deepcopy(student), teacher=None, args=make_config(tmp_path, max_steps=1), train_dataset=rows,
        data_collator=collator,
    )
    with pytest.raises(ValueError, match="no teacher"):
        no_cache.train()


def test_collator_shares_inputs_only_when_preprocessing_matches(open_clip_teacher, hf_teacher, shapes):
    own = CLIPDistillationCollator(open_clip_teacher.transformers_processor(), open_clip_teacher.inputs())
    assert own.share_images and own.share_text
    batch = own([shapes[i] for i in range(3)])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    # A teacher whose image normalisation differs gets its own pixels.
    proc = copy.deepcopy(hf_teacher.transformers_processor())
    proc.image_processor.image_mean = [0.5, 0.5, 0.5]
    other = CLIPDistillationCollator(proc, open_clip_teacher.inputs())
    assert not other.share_images and other.share_text
    batch = other([shapes[i] for i in range(3)])
    assert batch["teacher_pixel_values"].shape == batch["pixel_values"].shape == (3, 3, 32, 32)
    assert not torch.allclose(batch["teacher_pixel_values"], batch["pixel_values"])
    with pytest.raises(KeyError, match="'caption'"):
        CLIPDistillationCollator(proc, text_column="caption")([shapes[0]])


def test_save_model_writes_only_a_loadable_student(tmp_path, open_clip_teacher, shapes):
    trainer = make_trainer(open_clip_teacher, shapes, make_config(tmp_path, max_steps=1))
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    keys = load_file(out / "model.safetensors").keys()
    assert not any(k.startswith(("teacher", "model.")) for k in keys)
    reloaded = CLIPModel.from_pretrained(out)
    assert reloaded.config.vision_config.num_hidden_layers == 2
    processor = AutoProcessor.from_pretrained(out)
    enc = processor(text=["a red circle"], images=[shapes[0]["image"]], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = reloaded(**enc).logits_per_image
    assert logits.shape == (1, 1)


def test_resume_from_checkpoint_continues_at_the_right_step(tmp_path, open_clip_teacher, shapes):
    student, _ = build_student(open_clip_teacher.to_transformers())
    straight = make_trainer(open_clip_teacher, shapes, make_config(tmp_path / "straight", max_steps=4),
                            student=copy.deepcopy(student))
    straight.train()
    first = make_trainer(open_clip_teacher, shapes,
                         make_config(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2),
                         student=copy.deepcopy(student))
    first.train()
    ckpt = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert ckpt.is_dir()
    resumed = make_trainer(open_clip_teacher, shapes,
                           make_config(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2),
                           student=copy.deepcopy(student))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert steps[0] <= 2 < steps[-1] == 4  # history restored from the checkpoint, then steps 3 and 4
    for (n, pa), pb in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=n)
