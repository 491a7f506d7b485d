"""mmkd.interop.to_sentence_transformers / `mmkd export --format sentence-transformers`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image


@pytest.fixture()
def student_dir(tiny_hf_clip_dir, tmp_path):
    path = tmp_path / "student"
    shutil.copytree(tiny_hf_clip_dir, path)
    (path / "training_summary.json").write_text(json.dumps({"global_step": 3}))  # a run record, copied along
    return path


def test_sentence_transformers_encodes_images_and_strings_like_the_student(student_dir, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPModel, CLIPProcessor, pipeline

    from mmkd.cli import main
    from mmkd.hub import files_to_push

    out = tmp_path / "st"
    assert main(["export", "--format", "sentence-transformers", str(student_dir), str(out)]) == 0
    assert "SentenceTransformer(" in capsys.readouterr().out
    model = SentenceTransformer(str(out), device="cpu")
    images = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (31, 64), (10, 200, 90))]
    captions = ["a red square", "a long caption about a green rectangle on a table"]
    reference, processor = CLIPModel.from_pretrained(student_dir).eval(), CLIPProcessor.from_pretrained(student_dir)
    with torch.no_grad():
        want_image = reference.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        want_text = reference.get_text_features(**processor.tokenizer(captions, padding=True, return_tensors="pt")
                                                ).pooler_output
    torch.testing.assert_close(model.encode(images, convert_to_tensor=True), want_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode(captions, convert_to_tensor=True), want_text, atol=1e-5, rtol=0)
    # still the student's transformers folder, with its record, and complete for `mmkd push`
    scores = pipeline("zero-shot-image-classification", model=str(out), device="cpu")(
        images[0], candidate_labels=["red", "green"])
    assert len(scores) == 2
    pushed = {p.as_posix() for p in files_to_push(out)}
    assert {"modules.json", "config_sentence_transformers.json", "training_summary.json", "config.json"} <= pushed
    assert not (out / "README.md").exists()  # mmkd push renders the card


def test_a_failed_check_writes_nothing(student_dir, tmp_path, monkeypatch):
    import mmkd.interop.to_sentence_transformers as to_st

    monkeypatch.setattr(to_st, "TOLERANCE", -1.0)
    out = tmp_path / "exports" / "st"
    with pytest.raises(RuntimeError, match="sentence-transformers' image embeddings differ"):
        to_st.export_sentence_transformers(student_dir, out)
    assert list((tmp_path / "exports").iterdir()) == []
