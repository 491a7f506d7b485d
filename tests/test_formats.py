"""mmkd.interop.formats: which formats a student folder holds and the model card's "Formats" section that lists
them (rewritten in place when exports are added; the push tests check the pushed cards end to end)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmkd.interop.formats import BEGIN, END, available_formats, formats_section, update_formats_section


@pytest.fixture
def folder(tiny_hf_clip_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_hf_clip_dir, tmp_path / "student"))


def test_the_formats_a_folder_holds(folder, tmp_path):
    assert available_formats(folder) == ["transformers"]
    (folder / "modules.json").write_text("[]")
    assert available_formats(folder) == ["transformers", "sentence-transformers"]
    (folder / "open_clip_config.json").write_text("{}")
    assert "open_clip" not in available_formats(folder)  # the config alone is no open_clip model
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    assert available_formats(folder) == ["transformers", "open_clip", "sentence-transformers"]
    (folder / "onnx").mkdir()
    (folder / "onnx" / "image_encoder.onnx").write_bytes(b"")
    assert "onnx" not in available_formats(folder)  # not an mmkd export: no metadata
    (folder / "onnx" / "mmkd_onnx.json").write_text(json.dumps({"int8_report": None}))
    assert "onnx" not in available_formats(folder)  # the text encoder is missing
    (folder / "onnx" / "text_encoder.onnx").write_bytes(b"")
    assert available_formats(folder)[-1] == "onnx"
    for name in ("image_encoder.int8.onnx", "text_encoder.int8.onnx"):
        (folder / "onnx" / name).write_bytes(b"")
    assert available_formats(folder)[-2:] == ["onnx", "onnx-int8"]
    section = formats_section(folder, "me/x")
    assert section.startswith(BEGIN) and section.endswith(END) and "### ONNX int8" in section
    assert "were not measured at export" in section and 'snapshot_download("me/x"' in section
    assert "image_encoder.int8.onnx" in section.split("```python")[1]  # the snippet runs the int8 encoders

    match = tmp_path / "matcher"
    match.mkdir()
    (match / "config.json").write_text(json.dumps({"model_type": "mmkd_resnet_minilm"}))
    assert available_formats(match) == ["mmkd"]
    assert 'ResNetMiniLMMatcher.from_pretrained("me/m")' in formats_section(match, "me/m")


def test_the_card_section_is_rewritten_in_place_or_added_before_the_evaluation(folder):
    card = "---\ntags: [mmkd]\n---\n# model\n\nintro\n\n## Evaluation\n\nresults\n"
    first = update_formats_section(card, folder, "me/x")
    assert first.index(BEGIN) < first.index("## Evaluation") and first.count(BEGIN) == 1
    assert first.replace(formats_section(folder, "me/x") + "\n\n", "") == card  # nothing else changed
    assert update_formats_section(first, folder, "me/x") == first  # idempotent
    (folder / "modules.json").write_text("[]")
    second = update_formats_section(first, folder, "me/x")
    assert second.count(BEGIN) == 1 and "| sentence-transformers |" in second
    assert second.replace(formats_section(folder, "me/x"), "") == first.replace(
        first[first.index(BEGIN):first.index(END) + len(END)], "")
    assert update_formats_section("# bare card\n", folder, "me/x").endswith(END + "\n")
