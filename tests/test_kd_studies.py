"""The research-001 studies' shared pieces: the study runner's reuse, seeds and comparisons, the one grid writer of
both recipes, and the study command line (the runs themselves are the studies, not tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmkd.reporting.studies import RUN_RECORD, StudyRunner, aggregate, close_pairs
from mmkd.reporting.sweeps import Grid, grid_values, parse_values, run_grid, write_grid
from tests.conftest import load_recipe

FAKE_RECIPE = '''
import json, sys
from pathlib import Path

CALLS = Path(__file__).with_suffix(".calls")


def main(argv):
    out = Path(argv[argv.index("--output_dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    with CALLS.open("a") as f:
        f.write(" ".join(argv) + "\\n")
    (out / "training_summary.json").write_text(json.dumps({"student": {"parameters": {"total": 7}}}))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [{"train_runtime": 2.0}]}))
    return {"student": {"parameters": {"total": 7}}}
'''


def test_runner_trains_once_per_arguments_and_records_completion(tmp_path, monkeypatch):
    recipe = tmp_path / "fake_recipe.py"
    recipe.write_text(FAKE_RECIPE)
    runner = StudyRunner(tmp_path / "study", test=None, templates=["a {c}."], recipe=recipe)
    monkeypatch.setattr(runner, "evaluate", lambda folder: {"acc1": 0.5, "acc5": 0.9, "seconds_per_step": 0.5})
    first = runner.run("kd", ["--alpha", "1"], seed=0)
    assert first["folder"] == str(tmp_path / "study" / "kd-seed0") and first["parameters"] == 7
    runner.run("kd", ["--alpha", "1"], seed=0)  # reused: same arguments, finished
    calls = recipe.with_suffix(".calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].endswith("--seed 0 --output_dir " + first["folder"])
    config = tmp_path / "c.yaml"
    config.write_text("a: 1\n")
    runner.run("kd", ["--alpha", "1", "--config", str(config)], seed=0)  # other arguments: trained again
    config.write_text("a: 2\n")
    runner.run("kd", ["--alpha", "1", "--config", str(config)], seed=0)  # the YAML edited: trained again
    runner.run("kd", ["--alpha", "1", "--config", str(config)], seed=0)  # reused
    assert len(recipe.with_suffix(".calls").read_text().splitlines()) == 3
    runner.run("kd", ["--alpha", "0.5"], seed=0)  # other arguments: trained again into the same folder
    (tmp_path / "study" / "kd-seed1").mkdir()
    runner.run("kd", ["--alpha", "0.5"], seed=1)  # a folder without a record is an unfinished run: trained
    assert len(recipe.with_suffix(".calls").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "study" / "kd-seed1" / RUN_RECORD).read_text())["argv"][-1].endswith("kd-seed1")
    from mmkd.reporting.studies import seconds_per_step

    assert seconds_per_step(tmp_path / "study" / "kd-seed1") == 0.5


def test_aggregate_and_close_pairs():
    runs = [{"seed": 0, "acc1": 0.80, "acc5": 0.99, "seconds_per_step": 0.2, "parameters": 5},
            {"seed": 1, "acc1": 0.82, "acc5": 0.97, "seconds_per_step": 0.4, "parameters": 5}]
    row = aggregate(runs)
    assert row["seeds"] == [0, 1] and row["acc1"] == pytest.approx(0.81) and row["acc5"] == pytest.approx(0.98)
    assert row["acc1_sd"] == pytest.approx(0.0141421, abs=1e-6) and row["acc1_per_seed"] == [0.80, 0.82]
    assert aggregate(runs[:1])["acc1_sd"] is None
    rows = {"a": {"acc1": 0.80}, "b": {"acc1": 0.805}, "c": {"acc1": 0.70}, "d": {"acc1": 0.7095}}
    assert close_pairs(rows, [("a", "b"), ("a", "c"), ("c", "d"), ("x", "a")]) == {"a", "b", "c", "d"}
    assert close_pairs(rows, [("a", "c")]) == set()


def test_one_grid_writer_for_every_recipe(tmp_path):
    rows = run_grid(lambda a, t: {"f1": a * t / 10}, [0.25, 0.75], [1, 3], keys=("alpha", "temperature"))
    assert [(r["alpha"], r["temperature"]) for r in rows] == [(0.25, 1), (0.25, 3), (0.75, 1), (0.75, 3)]
    grid = Grid("alpha", [0.25, 0.75], "temperature", [1, 3, 5], metric="f1", row_label="α", col_label="T")
    values = write_grid(tmp_path, rows, grid, title="a sweep", extra={"note": 1})
    assert values.shape == (2, 3) and np.isnan(values[0, 2]) and values[1, 1] == pytest.approx(0.225)
    md = (tmp_path / "sweep.md").read_text()
    assert md.startswith("# a sweep") and "| α \\ T | 1 | 3 | 5 |" in md and "| 0.75 | 7.50 | 22.50 | n/a |" in md
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["runs"] == rows and record["alpha"] == [0.25, 0.75] and record["note"] == 1
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert grid_values(rows, Grid("temperature", [3], "alpha", [0.25], "f1")).tolist() == [[0.075]]
    with pytest.raises(ValueError, match="--alphas=0.5,x: a comma-separated list"):
        parse_values("--alphas", "0.5,x")


def test_study_command_line_refuses_bad_values_before_any_run(tmp_path, capsys):
    study = load_recipe("kd_studies")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    for argv, expected in ((["grid", "--alphas", "0.5,2"], "α is in [0, 1]"),
                           (["data-fraction", "--fractions", "0,1"], "--fractions"),
                           (["teacher-free", "--virtual_a", "1.2"], "--virtual_a"),
                           (["grid", "--temperatures", "x"], "--temperatures=x"),
                           (["chain"], "invalid choice: 'chain'"),
                           (["assistants", "--alpha", "0"], "--alpha 0: the KD recipe's α is in (0, 1]")):
        with pytest.raises(SystemExit) as info:
            study.parse([*argv, "--teacher", str(teacher)])
        assert info.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.parse(["grid", "--teacher", str(tmp_path / "none")])
    assert "no CLIPModel folder" in capsys.readouterr().err
    args = study.parse(["assistants", "--teacher", str(teacher), "--seeds", "0,1,2"])
    assert args.seeds == [1, 2]  # the first seed is never run twice


def test_study_recipes_name_their_runs_by_configuration():
    study = load_recipe("kd_studies")
    assert study.kd_args(0, 8) == ["--class_kd_weight", "1", "--class_kd_alpha", "0", "--class_kd_temperature", "1"]
    assert study.kd_args(0.5, 8)[-1] == "8"
    assert study.student_name(0, 4) == "s2x96-scratch" and study.student_name(0.5, 4) == "s2x96-kd-a0.5-T4"
    assert study.shape_args(1, 96) == ["--student_vision_layers", "1", "--student_vision_width", "96",
                                       "--student_text_layers", "1", "--student_text_width", "96"]


def test_study_plots(tmp_path):
    from mmkd.reporting.plots import fraction_curve, study_bars

    row = {"acc1": 0.8, "acc1_sd": 0.01}
    study_bars([{**row, "label": "from scratch (α = 0)"}, {**row, "label": "KD", "acc1_sd": None}],
               tmp_path / "bars.png", "t")
    fraction_curve([{"fraction": f, "scratch": row, "kd": {**row, "acc1": 0.81}, "margin": 0.01}
                    for f in (0.1, 1)], tmp_path / "curve.png")
    assert (tmp_path / "bars.png").stat().st_size > 1000 and (tmp_path / "curve.png").stat().st_size > 1000


def test_evaluation_is_kept_with_the_weights_it_measured(tmp_path, monkeypatch):
    import mmkd.eval.zeroshot as zeroshot

    calls = []
    monkeypatch.setattr(zeroshot, "evaluate_zeroshot",
                        lambda model, test, **kw: calls.append(model) or {"acc1": 0.7, "acc5": 0.9})

    class Test(list):
        name = "fake"

    runner = StudyRunner(tmp_path, Test([0, 1]), ["a {c}."])
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"train_runtime": 1}]}))
    first = runner.evaluate(folder)
    assert runner.evaluate(folder) == first and len(calls) == 1  # kept
    StudyRunner(tmp_path, Test([0, 1]), ["another {c}."]).evaluate(folder)  # other templates: measured again
    (folder / "model.safetensors").write_bytes(b"new weights!")  # retrained: measured again
    runner.evaluate(folder)
    assert len(calls) == 3
