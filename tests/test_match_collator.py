"""MatchCollator: one (image, text, label) example -> the student's and the teacher's inputs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import BertConfig, CLIPProcessor

from mmkd.matching import ResNetMiniLMMatcher, load_text_tokenizer
from mmkd.matching.collator import TEACHER_LOGITS, MatchCollator, clip_inputs, student_inputs


@pytest.fixture(scope="module")
def student():
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    return ResNetMiniLMMatcher.from_components("resnet18", text_encoder=text, image_size=48)


def examples():
    return [{"image": Image.new("L", (28, 28), 40 * i), "text": t, "label": i % 2}
            for i, t in enumerate(["a photo of a sneaker", "a bag", "a photo of a very long dress indeed"])]


def test_two_input_sets(student, tiny_hf_clip_dir):
    tokenizer, processor = load_text_tokenizer(), CLIPProcessor.from_pretrained(tiny_hf_clip_dir)
    batch = MatchCollator(student_inputs(student, tokenizer), clip_inputs(processor))(examples())
    assert batch["pixel_values"].shape == (3, 3, 48, 48)  # the student's transform (grey images made RGB)
    assert batch["teacher_pixel_values"].shape == (3, 3, 32, 32)  # the CLIP processor's
    texts = [e["text"] for e in examples()]
    assert torch.equal(batch["input_ids"], tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    assert torch.equal(batch["teacher_input_ids"],
                       processor.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    assert "token_type_ids" in batch and "teacher_token_type_ids" not in batch
    assert batch["labels"].tolist() == [0.0, 1.0, 0.0] and batch["labels"].dtype == torch.float32
    # The student's pixels are its own transform's: ImageNet normalisation of the resized image.
    expected = student.image_transform()(examples()[1]["image"].convert("RGB"))
    assert torch.allclose(batch["pixel_values"][1], expected)


def test_cached_teacher_logits_replace_the_teacher_inputs(student, tiny_hf_clip_dir):
    rows = [{**e, TEACHER_LOGITS: float(i)} for i, e in enumerate(examples())]
    batch = MatchCollator(student_inputs(student, load_text_tokenizer()),
                          clip_inputs(CLIPProcessor.from_pretrained(tiny_hf_clip_dir)))(rows)
    assert batch[TEACHER_LOGITS].tolist() == [0.0, 1.0, 2.0]
    assert not any(k.startswith("teacher_pixel") or k.startswith("teacher_input") for k in batch)


def test_bad_rows(student):
    collator = MatchCollator(student_inputs(student, load_text_tokenizer()))
    with pytest.raises(KeyError, match="'label'"):
        collator([{"image": Image.new("RGB", (8, 8)), "text": "x"}])
    with pytest.raises(ValueError, match="0 \\(mismatch\\) or 1"):
        collator([{"image": Image.new("RGB", (8, 8)), "text": "x", "label": 2}])
