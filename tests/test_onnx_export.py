"""mmkd.interop.to_onnx / `mmkd export --format onnx`: ONNX encoders that onnxruntime runs to the CLIPModel's
embeddings, an int8 copy, and bad input refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is installed by `make test`")


@pytest.fixture(scope="module")
def exported(tiny_hf_clip_dir, tmp_path_factory):
    from mmkd.interop.to_onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "student-onnx"
    return out, export_onnx(tiny_hf_clip_dir, out, int8=True)


def _reference(model_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)


def test_onnxruntime_gives_the_clip_models_embeddings(tiny_hf_clip_dir, exported):
    """Real photos and captions of several lengths, batch 1 and 3, read with the processor saved in the folder."""
    import onnxruntime as ort
    from transformers import CLIPImageProcessor, CLIPTokenizerFast

    from mmkd.interop.to_onnx import check_images

    out, result = exported
    assert sorted(p.name for p in out.glob("*.onnx")) == [
        "image_encoder.int8.onnx", "image_encoder.onnx", "text_encoder.int8.onnx", "text_encoder.onnx"]
    model, _ = _reference(tiny_hf_clip_dir)
    image_processor, tokenizer = CLIPImageProcessor.from_pretrained(out), CLIPTokenizerFast.from_pretrained(out)
    images = check_images()
    image = ort.InferenceSession(str(out / "image_encoder.onnx"))
    text = ort.InferenceSession(str(out / "text_encoder.onnx"))
    captions = ["a dog", "two cats sleeping on a red sofa next to a window", "an old temple at dusk"]
    for rows in (slice(0, 1), slice(0, 3)):
        pixels = image_processor(images[rows], return_tensors="np")["pixel_values"]
        tokens = tokenizer(captions[rows], padding=True, return_tensors="np")
        got_image = image.run(None, {"pixel_values": pixels})[0]
        got_text = text.run(None, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})[0]
        with torch.no_grad():
            want_image = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
            want_text = model.get_text_features(input_ids=torch.from_numpy(tokens["input_ids"]),
                                                attention_mask=torch.from_numpy(tokens["attention_mask"])
                                                ).pooler_output.numpy()
        np.testing.assert_allclose(got_image, want_image, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_text, want_text, atol=1e-4, rtol=0)
    assert max(result["max_abs_diff"].values()) < 1e-4


def test_the_int8_encoders_are_smaller_and_close(tiny_hf_clip_dir, exported):
    import onnxruntime as ort

    out, _ = exported
    model, processor = _reference(tiny_hf_clip_dir)
    size = {p.name: p.stat().st_size for p in out.glob("*.onnx")}
    # int8 weights of the MatMul / Gemm / Gather nodes; the tiny image tower's patch conv and norms stay float
    assert size["image_encoder.int8.onnx"] < 0.8 * size["image_encoder.onnx"]
    assert size["text_encoder.int8.onnx"] < 0.3 * size["text_encoder.onnx"]
    tokens = processor.tokenizer(["a dog", "a red car on a road"], padding=True, return_tensors="np")
    fp32 = ort.InferenceSession(str(out / "text_encoder.onnx")).run(None, dict(tokens))[0]
    int8 = ort.InferenceSession(str(out / "text_encoder.int8.onnx")).run(None, dict(tokens))[0]
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.95 and not np.allclose(fp32, int8, atol=1e-6)  # quantized, and still the same space


def test_a_failed_check_writes_nothing(tiny_hf_clip_dir, tmp_path, monkeypatch):
    import mmkd.interop.to_onnx as to_onnx

    monkeypatch.setattr(to_onnx, "TOLERANCE", -1.0)  # every comparison fails
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="onnxruntime's image embeddings differ"):
        to_onnx.export_onnx(tiny_hf_clip_dir, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no staging folder left either


def test_the_command_line_refuses_bad_input_in_one_line(tmp_path, capsys):
    from mmkd.cli import main

    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text('{"model_type": "bert"}')
    assert main(["export", "--format", "onnx", str(tmp_path / "notclip"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model_type 'bert'" in err and not (tmp_path / "out").exists()
    assert main(["export", "--int8", str(tmp_path / "notclip"), str(tmp_path / "out")]) == 2
    assert "--int8 applies to --format onnx only" in capsys.readouterr().err


def test_zero_shot_through_onnxruntime_predicts_what_torch_predicts(tiny_hf_clip_dir, exported, tmp_path):
    """evaluate_zeroshot(backend="onnxruntime") and the CLI flag: the same protocol, the same top-1 prediction for
    every image as the torch path (a folder of generated images in 6 classes); int8 runs the same way."""
    from mmkd.cli import main
    from mmkd.eval.zeroshot import evaluate_zeroshot
    from tests.test_zeroshot import COLOR_NAMES, TWO_TEMPLATES, write_folder

    out, _ = exported
    folder = write_folder(tmp_path / "colors", 18, COLOR_NAMES)
    kw = dict(templates=TWO_TEMPLATES, batch_size=4, progress=False, return_predictions=True)
    torch_run = evaluate_zeroshot(str(tiny_hf_clip_dir), str(folder), **kw)
    onnx_run = evaluate_zeroshot(str(out), str(folder), backend="onnxruntime", **kw)
    assert onnx_run["predictions"] == torch_run["predictions"] and len(onnx_run["predictions"]) == 18
    assert onnx_run["acc1"] == torch_run["acc1"] and onnx_run["per_class_accuracy"] == torch_run["per_class_accuracy"]
    int8_run = evaluate_zeroshot(str(out), str(folder), backend="onnxruntime-int8", **kw)
    assert int8_run["num_images"] == 18 and 0 <= int8_run["acc1"] <= 1
    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        evaluate_zeroshot(str(tiny_hf_clip_dir), str(folder), backend="onnxruntime", **kw)

    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(TWO_TEMPLATES))
    report = tmp_path / "zs.json"
    assert main(["zeroshot", "--model", str(out), "--backend", "onnxruntime", "--dataset", str(folder),
                 "--templates", str(templates), "--batch-size", "4", "--no-progress", "--output", str(report)]) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["acc1"] == torch_run["acc1"] and row["num_images"] == 18


def test_the_int8_report_measures_size_speed_and_accuracy(tiny_hf_clip_dir, exported, tmp_path, capsys):
    """What the model card's int8 section shows: sizes of the written files, onnxruntime speed of both, the embedding
    cosine, and (``--eval-dataset``) both accuracies as evaluate_zeroshot's onnxruntime backends give them."""
    from mmkd.cli import main
    from mmkd.eval.zeroshot import evaluate_zeroshot
    from mmkd.interop.to_onnx import METADATA_FILE
    from tests.test_zeroshot import COLOR_NAMES, write_folder

    out, result = exported
    report = result["int8_report"]
    assert json.loads((out / METADATA_FILE).read_text())["int8_report"] == report  # where the card reads it
    for kind, names in (("fp32", ("image_encoder.onnx", "text_encoder.onnx")),
                        ("int8", ("image_encoder.int8.onnx", "text_encoder.int8.onnx"))):
        assert report["size_mb"][kind] == sum((out / n).stat().st_size for n in names) / 1e6
        assert report["image_per_s"][kind] > 0 and report["text_per_s"][kind] > 0
    assert report["batch_size"] == 32 and report["text_length"] == 77 and report["accuracy"] is None
    assert 0.95 < report["min_cosine_to_fp32"]["text"] <= 1 + 1e-9
    assert -1 <= report["min_cosine_to_fp32"]["image"] <= 1 + 1e-9

    folder = write_folder(tmp_path / "colors", 12, COLOR_NAMES)
    target = tmp_path / "measured"
    assert main(["export", "--format", "onnx", "--int8", "--eval-dataset", str(folder), str(tiny_hf_clip_dir),
                 str(target)]) == 0
    printed = capsys.readouterr().out
    acc = json.loads((target / METADATA_FILE).read_text())["int8_report"]["accuracy"]
    assert acc["dataset"] == str(folder) and acc["num_images"] == 12
    for kind, backend in (("fp32", "onnxruntime"), ("int8", "onnxruntime-int8")):
        direct = evaluate_zeroshot(str(target), str(folder), backend=backend, progress=False)
        assert (acc[f"{kind}_acc1"], acc[f"{kind}_acc5"]) == (direct["acc1"], direct["acc5"])
    delta = 100 * (acc["int8_acc1"] - acc["fp32_acc1"])
    assert f"zero-shot acc@1 on {folder} (12 images)" in printed and f"(delta {delta:+.2f} points)" in printed


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--eval-dataset", "fashion_mnist"], "--eval-dataset applies to --format onnx --int8 only"),
        (["--int8", "--eval-dataset", "cifar1O"], "unknown dataset 'cifar1O'"),
        (["--int8", "--eval-dataset", "fashion_mnist", "--max-examples", "0"], "--max-examples must be >= 1"),
    ],
)
def test_int8_measurement_options_are_checked_before_anything_is_written(tiny_hf_clip_dir, tmp_path, capsys, extra,
                                                                        expected):
    from mmkd.cli import main

    assert main(["export", "--format", "onnx", *extra, str(tiny_hf_clip_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and not (tmp_path / "out").exists()
