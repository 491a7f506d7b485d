"""Teacher assistants (mmkd.students.chain and the recipe's --chain): the stage plan, the hand-over of each
stage's student as the next stage's teacher, and the per-stage reuse and resume."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import CLIPModel

from mmkd.checks import ConfigError
from mmkd.students.chain import CHAIN_RECORD, ChainStage, check_chain, parse_chain
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
TEACHER = {"vision": (4, 64), "text": (4, 64)}  # the smoke config's tiny open_clip teacher: 4+4 layers, width 64


def test_parse_chain():
    assert parse_chain("3,2") == [ChainStage(3), ChainStage(2)]
    assert parse_chain("3x24, 2x16") == [ChainStage(3, 24), ChainStage(2, 16)]
    assert [s.label for s in parse_chain("3,2x16")] == ["3L", "2Lx16"]
    for bad in ("3,,2", "three", "0", "2x0", "3y4"):
        with pytest.raises(ConfigError, match=f"chain={bad}"):
            parse_chain(bad)


@pytest.mark.parametrize("spec, student, expected", [
    ("2,3", {"vision": (1, None), "text": (1, None)}, "assistant 3L"),  # grows back
    ("4", {"vision": (1, None), "text": (1, None)}, "assistant 4L"),  # as big as the teacher
    ("3x72", {"vision": (1, None), "text": (1, None)}, "(vision: 3 layers, width 72)"),  # wider than the teacher
    ("2", {"vision": (2, None), "text": (1, None)}, "the student (vision: 2 layers"),  # the student not smaller
    ("3x16", {"vision": (2, 24), "text": (1, None)}, "width 24"),  # the student wider than its assistant
])
def test_every_model_of_a_chain_is_smaller_than_its_teacher(spec, student, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_chain(spec, parse_chain(spec), TEACHER, student)
    check_chain("3,2", parse_chain("3,2"), TEACHER, {"vision": (1, None), "text": (1, None)})  # a good one
    check_chain("4x24", parse_chain("4x24"), TEACHER, {"vision": (2, None), "text": (2, 16)})  # narrower, same depth


def _argv(out, *extra):
    return ["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "32", "--max_steps", "2",
            "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
            "--student_vision_layers", "1", "--student_text_layers", "1", *extra]


def test_chain_hands_each_stage_to_the_next_and_resumes_per_stage(tmp_path, monkeypatch, capsys):
    recipe = load_recipe("clip_student")
    out = tmp_path / "chain"
    summary = recipe.main(_argv(out, "--chain", "3,2x16"))
    first, second = out / "assistants" / "1-3L", out / "assistants" / "2-2Lx16"
    assert [s["stage"] for s in summary["chain"]] == ["3L", "2Lx16", "student"]
    assert summary["chain"][0]["teacher"].endswith("tiny_openclip_vit.json")
    assert [s["teacher"] for s in summary["chain"][1:]] == [str(first), str(second)]
    # each stage's student is the next stage's teacher, and the shapes shrink stage by stage
    for folder, teacher, layers, widths in ((first, None, 3, (64, 64)), (second, first, 2, (16, 16)),
                                            (out, second, 1, (16, 16))):
        config = CLIPModel.from_pretrained(folder).config
        assert (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers) == (layers, layers)
        assert (config.vision_config.hidden_size, config.text_config.hidden_size) == widths
        stage = json.loads((folder / "training_summary.json").read_text())
        if teacher is not None:
            assert stage["teacher"]["name"] == str(teacher)
        assert (folder / CHAIN_RECORD).is_file()
    first_weights = (first / "model.safetensors").stat().st_mtime_ns

    # its card names the chain's first teacher and the assistants, not the last assistant as "the teacher"
    from mmkd.reporting.cards import clip_student_card_data, render_clip_student_card

    data = clip_student_card_data(out, repo_id="me/chained")
    original = json.loads((first / "training_summary.json").read_text())["teacher"]
    assert data.teacher == summary["chain"][0]["teacher_name"] == original["name"] == "tiny_openclip_vit"
    assert data.teacher_parameters == original["parameters"]["total"] == summary["chain"][0]["teacher_parameters"]
    card = str(render_clip_student_card(data))
    params = [f"{s['parameters']:,}" for s in summary["chain"]]
    assert (f"through teacher assistants (Mirzadeh et al., 2020), each stage distilled from the one before:\n"
            f"`{original['name']}` → assistant `3L` ({params[0]} parameters) → assistant `2Lx16` ({params[1]} "
            "parameters) → this model. Its own stage started from the last assistant's weights (2+2\nlayers), "
            "keeping\nvision layers") in card
    assert "final norms are the last assistant's" in card and str(second) not in card
    # a summary written before the chain recorded its first teacher: read from the first stage's own summary
    saved = (out / "training_summary.json").read_text()
    older = json.loads(saved)
    for stage in older["chain"]:
        del stage["teacher_name"], stage["teacher_parameters"]
    (out / "training_summary.json").write_text(json.dumps(older))
    assert (clip_student_card_data(out).teacher, clip_student_card_data(out).teacher_parameters) == (
        data.teacher, data.teacher_parameters)
    (out / "training_summary.json").write_text(saved)

    # an interruption in the last stage: what a kill leaves -- its in-progress record, its first checkpoint
    record = json.loads((out / CHAIN_RECORD).read_text())
    assert record["complete"] is True and record["record"]["inputs"]["teacher_weights"]
    (out / CHAIN_RECORD).write_text(json.dumps({**record, "complete": False}))
    (out / "model.safetensors").unlink()
    shutil.rmtree(out / "checkpoint-2")
    assert (out / "checkpoint-1").is_dir()
    seen = []
    train = recipe.train
    monkeypatch.setattr(recipe, "train", lambda d, a, resume, argv=None: seen.append((a.output_dir, resume))
                        or train(d, a, resume, argv))
    again = recipe.main(_argv(out, "--chain", "3,2x16"))
    assert seen == [(str(out), str(out / "checkpoint-1"))]  # the assistants reused, the student resumed
    assert (first / "model.safetensors").stat().st_mtime_ns == first_weights
    assert again["global_step"] == 2 and (out / CHAIN_RECORD).is_file()

    # other options: a stage is reused only for the same arguments, and never resumes another run's checkpoints
    seen.clear()
    with pytest.raises(SystemExit) as info:
        recipe.main(_argv(out, "--chain", "3,2x16", "--learning_rate", "0.001"))
    assert info.value.code == 2 and f"{first} holds checkpoints of another run" in capsys.readouterr().err
    assert seen == []
    fresh = tmp_path / "fresh"
    recipe.main(_argv(fresh, "--chain", "3", "--learning_rate", "0.001"))
    assert [resume for _, resume in seen] == [None, None]  # a new chain starts every stage from the beginning
    # a retrained teacher (new weights) makes the stages after it stale: trained again
    seen.clear()
    shutil.rmtree(fresh / "assistants" / "1-3L")
    with pytest.raises(SystemExit) as info:  # the student's folder holds checkpoints of the old teacher's run
        recipe.main(_argv(fresh, "--chain", "3", "--learning_rate", "0.001"))
    assert "holds checkpoints of another run" in capsys.readouterr().err
    assert [folder for folder, _ in seen] == [str(fresh / "assistants" / "1-3L")]


def test_a_bad_chain_is_refused_before_anything_trains(tmp_path, capsys):
    recipe = load_recipe("clip_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(_argv(tmp_path / "x", "--chain", "2,3"))
    assert info.value.code == 2 and "chain=2,3: assistant 3L" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
