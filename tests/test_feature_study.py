"""The feature-distillation study's command line and table (the runs themselves are the study, not a test)."""

from __future__ import annotations

import pytest

from tests.conftest import load_recipe


def test_bad_choices_are_refused_before_any_run(tmp_path, capsys):
    study = load_recipe("feature_study")
    for argv, expected in ((["--variants", "output,hints"], "--variants hints: choose from output"),
                           (["--shapes", "wide"], "--shapes wide"),
                           (["--teacher", str(tmp_path)], "no CLIPModel folder")):
        with pytest.raises(SystemExit) as info:
            study.parse(argv)
        assert info.value.code == 2 and expected in capsys.readouterr().err


def test_the_table_reports_means_spreads_and_cross_model_accuracy():
    study = load_recipe("feature_study")
    rows = [{"shape": "narrow", "variant": "simkd", "seeds": [0, 1], "acc1": 0.8, "acc1_sd": 0.01, "acc5": 0.99,
             "seconds_per_step": 0.5, "student_image_teacher_text": 0.75, "teacher_image_student_text": 0.7},
            {"shape": "narrow", "variant": "hint-all", "seeds": [0], "acc1": 0.81, "acc1_sd": None, "acc5": 0.98,
             "seconds_per_step": 0.6}]
    lines = study.markdown(rows).splitlines()
    assert lines[2] == "| narrow | simkd | 0,1 | 80.00 ± 1.00 | 99.00 | 0.50 | 75.00 | 70.00 |"
    assert lines[3] == "| narrow | hint-all | 0 | 81.00 | 98.00 | 0.60 | n/a | n/a |"
