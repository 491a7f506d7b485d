"""No Hub token in a saved file, a log line or a launcher's error: the token reaches the push through the
environment only (``--hub_token`` is refused, see test_config_errors), and a failed push under ``accelerate launch``
prints no token."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, load_recipe
from tests.test_push import closed_port_endpoint, point_hub_at

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"


def files_holding(folder, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_failed_push_at_debug_level_leaves_no_token_anywhere(tmp_path, monkeypatch, capfd, caplog):
    point_hub_at(monkeypatch, closed_port_endpoint(), tmp_path)  # a Hub that cannot be reached
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    recipe, out = load_recipe("clip_student"), tmp_path / "run"
    with caplog.at_level(logging.DEBUG), pytest.raises(SystemExit) as info:
        recipe.main(["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "32",
                     "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_steps", "1",
                     "--use_cpu", "true", "--log_level", "debug", "--logging_steps", "1",
                     "--push_to_hub", "true", "--hub_model_id", "me/x"])
    assert "push to me/x" in str(info.value)  # the push did run, and failed
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err + caplog.text
    assert (out / "checkpoint-2" / "training_args.bin").is_file()
    assert files_holding(out, FAKE_TOKEN) == []


def test_accelerate_launch_prints_no_token_when_the_push_fails(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_TOKEN=FAKE_TOKEN, HF_ENDPOINT=closed_port_endpoint(), HF_HOME=str(tmp_path / "hf"),
               CUDA_VISIBLE_DEVICES="")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run(
        [accelerate, "launch", "--num_processes", "1", "recipes/clip_student.py", "--config", str(SMOKE),
         "--output_dir", str(out), "--num_generated_examples", "32", "--per_device_train_batch_size", "8",
         "--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
         "--push_to_hub", "true", "--hub_model_id", "me/x"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode != 0 and "push to me/x" in proc.stderr  # the child failed on the push...
    assert "returned non-zero exit status" in proc.stderr  # ...and accelerate printed its command line
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    assert files_holding(out, FAKE_TOKEN) == []


def test_a_mistyped_token_option_does_not_echo_the_token(tmp_path, capsys):
    recipe = load_recipe("clip_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "out"), "--hub_tokn", FAKE_TOKEN])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--hub_tokn" in err and FAKE_TOKEN not in err and "hf_***" in err
