"""Pruning beside distillation and int8 in the compression report: the levels are what the report says, magnitude
pruning zeroes the smallest weights and nothing else, structured pruning is a real smaller model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPModel

from mmkd import cli
from mmkd.reporting.compression import compression_report, format_report
from mmkd.reporting.plots import compression_plot
from mmkd.reporting.pruning import (
    magnitude_prune,
    parse_prune_spec,
    prunable_linears,
    prunable_sparsity,
    sparse_size,
    structured_prune,
)
from tests.conftest import tiny_clip_config
from tests.test_report import pair  # noqa: F401 -- the tiny teacher and student folders


@pytest.fixture(scope="module")
def model() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config()).eval()


def test_prune_specs():
    assert parse_prune_spec("magnitude:0.3,0.5") == [("magnitude", 0.3), ("magnitude", 0.5)]
    assert parse_prune_spec("structured:0.5") == [("structured", 0.5)]
    for bad, why in (("l1:0.5", "METHOD:LEVEL"), ("magnitude:1.5", "must be in \\(0, 1\\)"),
                     ("magnitude:0", "must be in"), ("structured:", "METHOD:LEVEL"), ("magnitude:0.3,.", "not a number")):
        with pytest.raises(ValueError, match=why):
            parse_prune_spec(bad)


@pytest.mark.parametrize("level", [0.3, 0.5, 0.7])
def test_magnitude_pruning_zeroes_exactly_the_smallest_weights(model, level):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = magnitude_prune(model, level)
    weights = [(m, getattr(m, name)) for m, name in prunable_linears(pruned)]
    n = sum(w.numel() for _, w in weights)
    assert prunable_sparsity(pruned) == round(level * n) / n  # exactly the level, over all Linear weights at once
    originals = {id(m): before[name + ".weight"] for name, m in pruned.named_modules() if isinstance(m, torch.nn.Linear)}
    zeroed = torch.cat([originals[id(m)][w == 0].abs() for m, w in weights])
    kept = torch.cat([originals[id(m)][w != 0].abs() for m, w in weights])
    assert zeroed.max() <= kept.min()  # global: the smallest magnitudes, whichever layer they are in
    for name, p in pruned.named_parameters():  # kept weights untouched, everything that is not a Linear weight too
        mask = p != 0
        assert torch.equal(p[mask], before[name][mask])
        if not name.endswith("weight") or "embedding" in name or "norm" in name:
            assert torch.equal(p, before[name])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the source is left alone
    assert not any(hasattr(m, "weight_orig") for m in pruned.modules())  # prune.remove made it permanent


def test_sparse_storage_shrinks_with_the_level(model):
    sizes = [sparse_size(magnitude_prune(model, level)) for level in (0.3, 0.5, 0.7)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sparse_size(model) > sizes[0]  # a dense weight stored as CSR costs more, not less


def test_structured_pruning_is_a_smaller_model_of_the_stated_shape(model):
    pruned, shapes = structured_prune(model, 0.5)
    vc = pruned.config.vision_config
    # tiny config: 2 heads of 16, MLP 64 -> 2 heads of 8, MLP 32; every layer kept
    assert shapes == {"vision": (16, 2, 32), "text": (16, 2, 32)}
    assert (vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers) == (16, 2, 32, 4)
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    assert pruned.config.distillation_init["width_plan"]["vision"]["importance"] == "magnitude"


def test_the_report_puts_pruned_teachers_beside_students_and_int8(open_clip_teacher, pair, tmp_path):  # noqa: F811
    report = compression_report(open_clip_teacher, [pair["student"], pair["student"]], None, batch_size=2,
                                repeats=1, prune=[("magnitude", 0.5), ("structured", 0.5)])
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "teacher int8", "teacher magnitude 50%", "teacher structured 50%", "student",
                          "student int8", "student (2)", "student (2) int8"]
    magnitude, structured, teacher = rows["teacher magnitude 50%"], rows["teacher structured 50%"], rows["teacher"]
    assert magnitude["linear_sparsity"] == pytest.approx(0.5, abs=1e-3) and teacher["linear_sparsity"] < 0.01
    assert magnitude["parameters"] == teacher["parameters"] > magnitude["nonzero_parameters"]
    assert magnitude["sparse_size_mb"] < teacher["sparse_size_mb"]
    assert structured["parameters"] < teacher["parameters"] and structured["widths"] != teacher["widths"]
    assert structured["source"] == magnitude["source"] == "teacher" and rows["student (2) int8"]["source"] == "student (2)"
    markdown = format_report(report)
    assert "magnitude pruning 50% of the teacher, without retraining" in markdown
    assert "Unstructured zeros do not speed up dense kernels" in markdown
    points = compression_plot(report, tmp_path / "plot.png")["image_per_s"]
    # the magnitude-pruned teacher is placed at its sparse size, every other model at its file size
    assert dict((label, x) for label, x, _ in points)["teacher magnitude 50%"] == magnitude["sparse_size_mb"]
    assert dict((label, x) for label, x, _ in points)["teacher structured 50%"] == structured["size_mb"]


def test_the_command_line_takes_several_students_and_prune_specs(pair, tmp_path, capsys):  # noqa: F811
    argv = ["report", "--teacher", str(pair["teacher"]), "--student", str(pair["student"]), "--student",
            str(pair["teacher"]), "--prune", "magnitude:0.3", "--dataset", "none", "--batch-size", "2", "--repeats",
            "1", "--no-int8", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher", "teacher magnitude 30%", "student", "teacher (2)"]
    assert report["settings"]["pruning"][0]["level"] == 0.3
    capsys.readouterr()
    assert cli.main(["report", "--teacher", str(pair["teacher"]), "--student", str(pair["student"]),
                     "--prune", "magnitude:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd report: error: --prune 'magnitude:2'") and "\n" not in err


def test_sparse_size_is_the_compact_csr(model):
    """int32 indices in their own storages: about values + column indices + row pointers, not twice that."""
    pruned = magnitude_prune(model, 0.7)
    nnz = sum(int((getattr(m, name) != 0).sum()) for m, name in prunable_linears(pruned))
    rows = sum(getattr(m, name).shape[0] + 1 for m, name in prunable_linears(pruned))
    dense_rest = sum(v.numel() * 4 for k, v in pruned.state_dict().items()
                     if not any(v is getattr(m, n) for m, n in prunable_linears(pruned)))
    csr_bytes = nnz * (4 + 4) + rows * 4
    assert sparse_size(pruned) == pytest.approx(dense_rest + csr_bytes, rel=0.05)  # + torch.save's small overhead


def test_duplicate_prune_rows_are_refused(open_clip_teacher, pair):  # noqa: F811
    with pytest.raises(ValueError, match="asked twice"):
        compression_report(open_clip_teacher, pair["student"], None, prune=[("magnitude", 0.5), ("magnitude", 0.5)])
