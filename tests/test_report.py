"""Tests for mmkd.reporting.compression (the teacher / student / int8 compression report, on tiny models, no timed
assertions) and mmkd.reporting.timing (the shared timing helper, on a fake clock)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from mmkd import cli
from mmkd.eval.zeroshot import evaluate_zeroshot
from mmkd.reporting import timing
from mmkd.reporting.compression import (
    TABLE_HEADER,
    compare_throughput,
    compression_report,
    format_report,
    quantize_int8,
    size_on_disk,
    table_cells,
)
from mmkd.reporting.plots import compression_plot
from mmkd.students import build_student
from tests.conftest import tiny_clip_config


def main(argv: list[str]) -> int:
    """``mmkd report ...`` in-process: the command's exit status."""
    return cli.main(["report", *argv])

CLASSES = ["red", "green", "blue", "yellow", "white"]  # >= 5 classes, so acc@5 is reported
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 30), (240, 240, 240)]
ROWS = ["teacher", "teacher int8", "student", "student int8"]


@pytest.fixture(scope="module")
def pair(open_clip_teacher, tmp_path_factory) -> dict[str, Path]:
    """The tiny open_clip teacher's transformers twin and its half-depth student, both saved with a processor."""
    root = tmp_path_factory.mktemp("report-pair")
    processor = open_clip_teacher.transformers_processor()
    teacher = open_clip_teacher.to_transformers()
    teacher.save_pretrained(root / "teacher")
    processor.save_pretrained(root / "teacher")
    student, _ = build_student(teacher)
    student.save_pretrained(root / "student")
    processor.save_pretrained(root / "student")
    return {"teacher": root / "teacher", "student": root / "student"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny labelled image folder: 5 colour classes x 3 noisy 32x32 images."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in zip(CLASSES, COLOURS, strict=True):
        (root / name).mkdir()
        for i in range(3):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cli_report(pair, image_folder, tmp_path_factory) -> dict:
    """One CLI run with accuracy; the files it wrote and the JSON it holds."""
    out = tmp_path_factory.mktemp("report-out")
    argv = [
        "--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--dataset", str(image_folder),
        "--batch-size", "4", "--repeats", "2", "--no-progress",
        "--plot", str(out / "report.png"), "--json", str(out / "report.json"), "--markdown", str(out / "report.md"),
    ]  # fmt: skip
    assert main(argv) == 0
    return {
        "dir": out,
        "report": json.loads((out / "report.json").read_text()),
        "markdown": (out / "report.md").read_text(),
    }


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == list(TABLE_HEADER)
    return cells[2:]  # past the header and the |---| line


# ------------------------------------------------------------------------------------------------ the numbers


def test_parameters_and_rows(open_clip_teacher, pair):
    report = compression_report(open_clip_teacher, pair["student"], None, batch_size=2, repeats=1)
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ROWS
    teacher_params = sum(p.numel() for p in open_clip_teacher.to_transformers().parameters())
    assert teacher_params == open_clip_teacher.num_parameters()  # the conversion is weight for weight
    student_params = sum(p.numel() for p in CLIPModel.from_pretrained(pair["student"]).parameters())
    assert rows["teacher"]["parameters"] == rows["teacher int8"]["parameters"] == teacher_params
    assert rows["student"]["parameters"] == rows["student int8"]["parameters"] == student_params
    assert rows["student int8"]["source"] == "student" and rows["student"]["source"] == "teacher"
    assert rows["teacher"]["layers"] == "4+4" and rows["student"]["layers"] == "2+2"
    for row in rows.values():
        assert row["image_per_s"] > 0 and row["text_per_s"] > 0 and row["size_bytes"] > 0
        assert len(row["image_seconds"]) == len(row["text_seconds"]) == 1
        assert row["acc1"] is None and row["acc5"] is None
    assert rows["teacher"]["image_speedup"] == rows["teacher"]["text_speedup"] == 1.0
    assert rows["student"]["image_speedup"] == pytest.approx(
        rows["student"]["image_per_s"] / rows["teacher"]["image_per_s"]
    )
    assert report["dataset"] is None and report["settings"]["quantization"].startswith("torch.ao")


def test_live_clip_models_with_their_processors(pair):
    teacher, student = CLIPModel.from_pretrained(pair["teacher"]), CLIPModel.from_pretrained(pair["student"])
    processor = CLIPProcessor.from_pretrained(pair["student"])
    with pytest.raises(ValueError, match="teacher_processor"):
        compression_report(teacher, student, student_processor=processor)
    with pytest.raises(TypeError, match="teacher must be"):
        compression_report(42, student, student_processor=processor)
    report = compression_report(teacher, student, teacher_processor=processor, student_processor=processor,
                                batch_size=2, repeats=1, quantize=False)
    assert [(r["model"], r["layers"]) for r in report["rows"]] == [("teacher", "4+4"), ("student", "2+2")]
    assert report["teacher"] == str(pair["teacher"]) and report["student"] == str(pair["student"])


def test_int8_is_smaller_when_linear_layers_dominate():
    cfg = tiny_clip_config(layers=6)
    for sub in (cfg.vision_config, cfg.text_config):
        sub.intermediate_size = 4096  # MLP weights outweigh the 49408 x 32 token embedding
    model = CLIPModel(cfg).eval()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear > sum(p.numel() for p in model.parameters()) / 2
    fp32_bytes, fp32_format = size_on_disk(model)
    quantized = quantize_int8(model)
    int8_bytes, int8_format = size_on_disk(quantized)
    assert fp32_format.startswith("save_pretrained") and int8_format == "torch.save(state_dict)"
    assert int8_bytes < 0.7 * fp32_bytes
    assert fp32_bytes >= 4 * sum(p.numel() for p in model.parameters())
    # the original is untouched and the copy still runs in transformers
    assert isinstance(model.visual_projection, torch.nn.Linear)
    with torch.no_grad():
        out = quantized.get_image_features(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output
    assert out.shape == (1, 16) and torch.isfinite(out).all()


def test_throughput_shape_and_inputs():
    model = CLIPModel(tiny_clip_config(layers=1)).eval()
    result = compare_throughput({"a": model, "b": model}, batch_size=3, repeats=2, warmup=0, text_length=10)
    assert set(result) == {"a", "b"}
    for r in result.values():
        assert len(r["image_seconds"]) == 2 and all(t > 0 for t in r["image_seconds"])
        assert r["image_per_s"] == pytest.approx(3 / float(np.median(r["image_seconds"])))
        assert r["text_length"] == 10 and r["image_size"] == 32 and r["threads"] == torch.get_num_threads()
        assert r["cpu_share"] > 0
    with pytest.raises(ValueError, match="text_length"):
        compare_throughput({"a": model}, text_length=78)
    with pytest.raises(ValueError, match="repeats"):
        compare_throughput({"a": model}, repeats=0)


def test_compare_throughput_interleaves_the_encoders_after_warmup(monkeypatch):
    models = {"a": CLIPModel(tiny_clip_config(layers=1)).eval(), "b": CLIPModel(tiny_clip_config(layers=1)).eval()}
    calls = []
    for name, model in models.items():
        for kind in ("image", "text"):
            encoder = getattr(model, f"get_{kind}_features")
            monkeypatch.setattr(model, f"get_{kind}_features",
                                lambda *a, _e=encoder, _k=(name, kind), **k: calls.append(_k) or _e(*a, **k))
    result = compare_throughput(models, batch_size=2, repeats=3, warmup=1, text_length=5)
    one_round = [("a", "image"), ("a", "text"), ("b", "image"), ("b", "text")]
    assert calls == one_round * (1 + 3)  # a warm-up round, then 3 timed rounds, every encoder once per round
    assert all(len(result[n][f"{k}_seconds"]) == 3 for n, k in one_round)


# ------------------------------------------------------------------------------------------------ timing


def test_interleaved_times_interleaves_and_times_each_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing, "perf_counter", lambda: clock[0])
    durations = {"a": iter([50.0, 3.0, 1.0, 8.0]), "b": iter([50.0, 10.0, 40.0, 20.0])}  # a warm-up, 3 timed
    calls = []

    def task(name):
        def run():
            calls.append(name)
            clock[0] += next(durations[name])
            return f"{name}{len(calls)}"

        return run

    t = timing.interleaved_times({"a": task("a"), "b": task("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert t.seconds == {"a": [3.0, 1.0, 8.0], "b": [10.0, 40.0, 20.0]}  # the warm-up round is not timed
    assert t.results == {"a": "a7", "b": "b8"} and t.wall_s == 82.0
    # the median, not the mean (4.0) nor the fastest (1.0) or the last call
    assert timing.median_rate(t.seconds["a"], 6) == 2.0 and timing.median_rate(t.seconds["b"], 40) == 2.0
    assert timing.median_rate([1.0, 4.0, 2.0, 9.0]) == 1 / 3.0  # an even count: the mean of the middle two
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved_times({"a": task("a")}, repeats=0)


def test_time_summary():
    s = timing.time_summary([1.0, 2.0, 3.0, 10.0], items=8)
    assert s == {"count": 4, "total_s": 16.0, "mean_s": 4.0, "median_s": 2.5, "per_s": 2.0, "per_s_at_median": 3.2,
                 "spread": 10.0, "disturbed": 1}  # fmt: skip
    assert timing.time_summary([1.0, 1.2, 1.4], disturbed_above=1.1)["disturbed"] == 1


def test_accuracy_equals_evaluate_zeroshot(cli_report, pair, image_folder):
    rows = {r["model"]: r for r in cli_report["report"]["rows"]}
    student = CLIPModel.from_pretrained(pair["student"]).eval()
    processor = CLIPProcessor.from_pretrained(pair["student"])
    direct = {
        "teacher": evaluate_zeroshot(str(pair["teacher"]), str(image_folder), progress=False),
        "student": evaluate_zeroshot(str(pair["student"]), str(image_folder), progress=False),
        "student int8": evaluate_zeroshot(
            quantize_int8(student), str(image_folder), processor=processor, progress=False
        ),
    }
    for name, result in direct.items():
        assert result["num_images"] == 15 and result["num_classes"] == 5
        assert rows[name]["acc1"] == result["acc1"], name
        assert rows[name]["acc5"] == result["acc5"], name
    dataset = cli_report["report"]["dataset"]
    assert dataset["num_images"] == 15 and dataset["num_classes"] == 5


def test_max_examples_is_a_seeded_subset_that_keeps_the_class_names(image_folder):
    from mmkd.reporting.compression import load_report_dataset

    full, _ = load_report_dataset(str(image_folder))
    ds, templates = load_report_dataset(str(image_folder), max_examples=7)
    again, _ = load_report_dataset(str(image_folder), max_examples=7)
    assert len(ds) == 7 and templates is None and ds.indices == again.indices == sorted(ds.indices)
    assert ds.classnames == full.classnames == sorted(CLASSES) and ds.name == full.name
    assert [ds[i][1] for i in range(7)] == [full[j][1] for j in ds.indices]
    with pytest.raises(ValueError, match="max_examples"):
        load_report_dataset(str(image_folder), max_examples=0)


# ------------------------------------------------------------------------------------------------ the outputs


def test_markdown_json_and_plot_agree(cli_report):
    report, markdown, out = cli_report["report"], cli_report["markdown"], cli_report["dir"]
    table = _table_rows(markdown)
    assert [cells[0] for cells in table] == ROWS
    for cells, row in zip(table, report["rows"], strict=True):
        assert cells == table_cells(row)
        # the cells are the dict's numbers, not something recomputed
        assert cells[3].replace(",", "") == str(row["parameters"])
        assert cells[4].replace(",", "") == str(row["nonzero_parameters"])
        assert float(cells[5]) == pytest.approx(row["size_bytes"] / 1e6, abs=0.005)
        assert float(cells[7]) == pytest.approx(row["image_per_s"], abs=0.05)
        assert float(cells[8]) == pytest.approx(row["text_per_s"], abs=0.05)
        assert float(cells[9].rstrip("×")) == pytest.approx(row["image_speedup"], abs=0.005)
        assert float(cells[11]) == pytest.approx(100 * row["acc1"], abs=0.005)
        assert float(cells[12]) == pytest.approx(100 * row["acc5"], abs=0.005)
        assert row["image_spread"] == max(row["image_seconds"]) / min(row["image_seconds"]) >= 1
    assert "Timing spread" in markdown and "CPU share during the timing" in markdown
    assert report["machine"]["cpu_share"] > 0
    assert format_report(report) == markdown
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = compression_plot(report, out / "again.png")
    assert points["acc1"] == [(r["model"], r["size_mb"], 100 * r["acc1"]) for r in report["rows"]]
    assert points["image_per_s"] == [(r["model"], r["size_mb"], r["image_per_s"]) for r in report["rows"]]


def test_dataset_none_skips_accuracy(pair, tmp_path, capsys):
    argv = ["--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--dataset", "none",
            "--batch-size", "2", "--repeats", "1", "--no-int8", "--no-progress", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher", "student"]
    assert all(r["acc1"] is None for r in report["rows"])
    table = _table_rows(capsys.readouterr().out)
    assert all(cells[11] == cells[12] == "n/a" for cells in table)
    assert set(compression_plot(report, tmp_path / "p.png")) == {"image_per_s"}


# ------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a teacher or a student is loaded."""
    import mmkd.teachers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(mmkd.teachers, "load_teacher", refuse)
    monkeypatch.setattr(CLIPModel, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--student", "{tmp}/missing"], "student directory"),
        (["--dataset", "cifar1O"], "unknown dataset 'cifar1O'"),
        (["--dataset", "{tmp}/no-such-folder"], "unknown dataset"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--data-dir", "{tmp}/nowhere"], "--data-dir"),
    ],
)
def test_bad_input_is_one_line_before_any_model(pair, tmp_path, capsys, no_model_loading, extra, expected):
    argv = ["--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--dataset", "none"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd report: error:") and "\n" not in err
    assert expected in err


def test_library_checks_before_loading(pair, tmp_path, no_model_loading):
    with pytest.raises(FileNotFoundError, match="student directory"):
        compression_report(str(pair["teacher"]), tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset"):
        compression_report(str(pair["teacher"]), pair["student"], "imagenet-typo")
    with pytest.raises(ValueError, match="batch_size"):
        compression_report(str(pair["teacher"]), pair["student"], batch_size=0)


# ------------------------------------------------------------------------------------------------ onnx rows


def test_onnx_rows_are_the_exports_in_onnxruntime(pair, image_folder, tmp_path):
    """--onnx adds, per model, its ONNX export and that export's int8 copy: measured on the files export_onnx writes,
    evaluated through evaluate_zeroshot's onnxruntime backends (the same numbers as a separate export gives)."""
    from mmkd.interop.to_onnx import export_onnx

    argv = ["--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--dataset", str(image_folder),
            "--batch-size", "2", "--repeats", "1", "--onnx", "--no-progress", "--json", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "teacher int8", "teacher onnx", "teacher onnx int8",
                          "student", "student int8", "student onnx", "student onnx int8"]
    assert [cells[0] for cells in _table_rows((tmp_path / "r.md").read_text())] == list(rows)
    assert "onnx: torch.onnx.export(dynamo=True)" in (tmp_path / "r.md").read_text()
    for which in ("teacher", "student"):
        export = export_onnx(str(pair[which]), tmp_path / which, int8=True)["paths"]
        fp32, int8 = rows[f"{which} onnx"], rows[f"{which} onnx int8"]
        assert fp32["technique"] == "onnx" and int8["technique"] == "onnx int8"
        assert fp32["source"] == int8["source"] == which
        assert fp32["parameters"] == int8["parameters"] == rows[which]["parameters"]
        assert fp32["layers"] == rows[which]["layers"] and fp32["size_format"].startswith("ONNX")
        assert fp32["size_bytes"] == sum(export[k].stat().st_size for k in ("image", "text"))
        assert int8["size_bytes"] == sum(export[k].stat().st_size for k in ("image_int8", "text_int8"))
        assert int8["size_bytes"] < fp32["size_bytes"]
        assert fp32["image_per_s"] > 0 and int8["text_per_s"] > 0 and fp32["sparse_size_mb"] is None
        for row, backend in ((fp32, "onnxruntime"), (int8, "onnxruntime-int8")):
            direct = evaluate_zeroshot(str(tmp_path / which), str(image_folder), backend=backend, progress=False)
            assert (row["acc1"], row["acc5"]) == (direct["acc1"], direct["acc5"]), row["model"]
        assert fp32["acc1"] == rows[which]["acc1"]  # fp32 onnxruntime = the CLIPModel to ~1e-6
    assert (tmp_path / "r.png").is_file()


def test_onnx_rows_without_onnxruntime_is_one_line(pair, capsys, monkeypatch, no_model_loading):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmkd report: error: ONNX export needs onnxruntime: pip install 'mmkd[onnx]'"
