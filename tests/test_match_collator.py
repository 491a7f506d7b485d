"""MatchCollator: one (image, text, label) example -> the student's and the teacher's inputs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import BertConfig, CLIPProcessor

from mmkd.data.collators import MatchCollator
from mmkd.data.preprocessing import processor_preprocessing
from mmkd.students import ResNetMiniLMMatcher, load_text_tokenizer


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
    batch = MatchCollator(student.preprocessing(tokenizer), processor_preprocessing(processor))(examples())
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


def test_cached_teacher_embeddings_replace_the_teacher_inputs(student, tiny_hf_clip_dir):
    rows = [{**e, "teacher_image_embeds": [float(i)] * 4, "teacher_text_embeds": [-float(i)] * 4}
            for i, e in enumerate(examples())]
    batch = MatchCollator(student.preprocessing(load_text_tokenizer()),
                          processor_preprocessing(CLIPProcessor.from_pretrained(tiny_hf_clip_dir)))(rows)
    assert batch["teacher_image_embeds"][:, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["teacher_text_embeds"].shape == (3, 4)
    assert not any(k.startswith("teacher_pixel") or k.startswith("teacher_input") for k in batch)


def test_bad_rows(student):
    collator = MatchCollator(student.preprocessing(load_text_tokenizer()))
    with pytest.raises(KeyError, match="'label'"):
        collator([{"image": Image.new("RGB", (8, 8)), "text": "x"}])
    with pytest.raises(ValueError, match="0 \\(mismatch\\) or 1"):
        collator([{"image": Image.new("RGB", (8, 8)), "text": "x", "label": 2}])
