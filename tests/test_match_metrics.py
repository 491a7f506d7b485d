"""Binary match metrics shipped as offline ``evaluate`` scripts: hand-computed values, scikit-learn agreement.

The scripts are loaded by file path, which never consults the Hub: these tests pass with or without
HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE, and the subprocess test below checks that with both unset and sockets blocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as sk
import torch
from transformers import EvalPrediction

from mmkd.eval.match_metrics import METRIC_SCRIPTS, METRICS, compute_metrics, load_metric, match_metrics

REPO = Path(__file__).resolve().parents[1]

# 8 pairs, predictions = logit > 0:
#   idx    0    1    2    3    4     5     6     7
#   label  1    1    1    0    1     1     0     0
#   logit  2.0  0.5  0.5  0.5  -1.0  -2.0  -1.0  -3.0
#   pred   1    1    1    1    0     0     0     0
#          TP   TP   TP   FP   FN    FN    TN    TN   -> TP = 3, FP = 1, FN = 2, TN = 2
# accuracy  = (3 + 2) / 8 = 5/8;  precision = 3 / (3 + 1) = 3/4;  recall = 3 / (3 + 2) = 3/5
# F1 = 2·(3/4·3/5)/(3/4 + 3/5) = 2·(9/20)/(27/20) = 2/3
# ROC-AUC (ties count 1/2): positives {2, .5, .5, −1, −2}, negatives {.5, −1, −3}, 5·3 = 15 pairs
#   2.0 beats all 3 -> 3;  each 0.5 beats −1, −3 and ties .5 -> 2.5 (twice);  −1 beats −3, ties −1 -> 1.5;
#   −2 beats −3 -> 1;  total 3 + 2.5 + 2.5 + 1.5 + 1 = 10.5 -> AUC = 10.5 / 15 = 0.7
#   (ranks: −3:1, −2:2, −1,−1: 3.5, .5×3: 6, 2: 8; positives 8 + 6 + 6 + 3.5 + 2 = 25.5; 25.5 − 5·6/2 = 10.5 ✓)
LABELS = [1, 1, 1, 0, 1, 1, 0, 0]
LOGITS = [2.0, 0.5, 0.5, 0.5, -1.0, -2.0, -1.0, -3.0]
EXPECTED = {"accuracy": 5 / 8, "precision": 3 / 4, "recall": 3 / 5, "f1": 2 / 3, "roc_auc": 0.7}


def _assert_metrics(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(value, abs=1e-12), name


def test_hand_computed_confusion_matrix_and_tied_auc():
    _assert_metrics(match_metrics(LOGITS, LABELS), EXPECTED)
    assert all(isinstance(v, float) for v in match_metrics(LOGITS, LABELS).values())


def test_threshold():
    # logit > 0.5 (strict): only idx 0 -> TP = 1, FP = 0, FN = 4, TN = 3
    # accuracy 4/8, precision 1/1, recall 1/5, F1 = 2·1 / (2·1 + 0 + 4) = 1/3; the AUC ignores the threshold
    got = match_metrics(LOGITS, LABELS, threshold=0.5)
    _assert_metrics(got, {"accuracy": 0.5, "precision": 1.0, "recall": 0.2, "f1": 1 / 3, "roc_auc": 0.7})


def test_input_types_and_layouts_agree():
    logits = torch.tensor(LOGITS)
    for lg, lb in [
        (np.array(LOGITS), np.array(LABELS)),
        (logits, torch.tensor(LABELS)),
        (logits[:, None], torch.tensor(LABELS, dtype=torch.float32)[:, None]),  # (B, 1) float BCE targets
        (logits.to(torch.bfloat16), torch.tensor(LABELS, dtype=torch.bool)),  # these logits are exact in bf16
        (np.array(LOGITS, dtype=np.float32)[:, None], np.array(LABELS, dtype=np.float64)),
    ]:
        _assert_metrics(match_metrics(lg, lb), EXPECTED)


def test_single_class_gives_no_auc_and_zero_division_zero():
    # all negatives, two predicted positive: TP = 0, FP = 2, FN = 0, TN = 2
    # accuracy 2/4; precision 0/2 = 0; recall 0/0 -> 0; F1 = 0 / (0 + 2 + 0) = 0; AUC undefined -> None
    got = match_metrics([1.0, 2.0, -1.0, -2.0], [0, 0, 0, 0])
    _assert_metrics(got, {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "roc_auc": None})
    # all negatives, none predicted positive: precision 0/0 -> 0, F1 0/0 -> 0
    got = match_metrics([-1.0, -2.0], [0, 0])
    _assert_metrics(got, {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "roc_auc": None})
    # all positives, all predicted negative: precision 0/0 -> 0, recall 0/2 = 0
    got = match_metrics([-1.0, -2.0], [1, 1])
    _assert_metrics(got, {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "roc_auc": None})


def test_roc_auc_all_tied_is_one_half():
    # every positive ties every negative: 1/2 per pair -> 0.5
    assert match_metrics([0.3] * 6, [1, 0, 1, 0, 0, 1])["roc_auc"] == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    logits = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if seed % 2:
        logits = np.round(logits, 1)  # many ties
    threshold = float(rng.normal(scale=0.3))
    predictions = (logits > threshold).astype(int)
    got = match_metrics(logits, labels, threshold=threshold)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions), abs=1e-12)
    assert got["precision"] == pytest.approx(sk.precision_score(labels, predictions, zero_division=0), abs=1e-12)
    assert got["recall"] == pytest.approx(sk.recall_score(labels, predictions, zero_division=0), abs=1e-12)
    assert got["f1"] == pytest.approx(sk.f1_score(labels, predictions, zero_division=0), abs=1e-12)
    assert got["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, logits), abs=1e-12)


def test_zero_division_agrees_with_scikit_learn():
    labels, predictions = np.array([0, 0, 1]), np.array([0, 0, 0])
    got = match_metrics(np.where(predictions == 1, 1.0, -1.0), labels)
    assert got["precision"] == sk.precision_score(labels, predictions, zero_division=0) == 0.0
    assert got["f1"] == sk.f1_score(labels, predictions, zero_division=0) == 0.0


@pytest.mark.parametrize("name", METRICS)
def test_load_metric_loads_the_shipped_script(name):
    metric = load_metric(name)
    assert metric.name == name
    if name == "roc_auc":
        # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
        assert metric.compute(prediction_scores=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1]) == {
            "roc_auc": 0.75
        }
    else:
        # predictions [1, 0, 1, 1] vs references [1, 0, 0, 1]: TP = 2, FP = 1, FN = 0, TN = 1
        expected = {"accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0, "f1": 4 / 5}[name]
        assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])[name] == pytest.approx(expected)


def test_load_metric_supports_incremental_batches():
    metric = load_metric("f1", keep_in_memory=True)
    metric.add_batch(predictions=[1, 1, 1, 1], references=[1, 1, 1, 0])
    metric.add_batch(predictions=[0, 0, 0, 0], references=[1, 1, 0, 0])
    assert metric.compute()["f1"] == pytest.approx(2 / 3)  # TP 3, FP 1, FN 2 -> 6 / 9


def test_load_metric_unknown_name():
    with pytest.raises(ValueError, match=r"unknown match metric 'auc'.*'accuracy'.*'roc_auc'"):
        load_metric("auc")


def test_scripts_reject_non_binary_inputs():
    with pytest.raises(ValueError, match=r"predictions must be binary \(0 or 1\), got values \[2\]"):
        load_metric("precision").compute(predictions=[0, 2], references=[0, 1])
    with pytest.raises(ValueError, match=r"references must be binary"):
        load_metric("roc_auc").compute(prediction_scores=[0.1, 0.2], references=[-1, 1])


def test_match_metrics_errors():
    with pytest.raises(ValueError, match=r"labels must be binary \(0 or 1\), got values \[-100\]"):
        match_metrics([1.0, -1.0], [1, -100])
    with pytest.raises(ValueError, match=r"same pairs.*\(3,\) and \(2,\)"):
        match_metrics([1.0, -1.0, 0.0], [1, 0])
    with pytest.raises(ValueError, match=r"logits must have shape \(B,\) or \(B, 1\).*\(2, 2\)"):
        match_metrics(np.zeros((2, 2)), [1, 0])
    with pytest.raises(ValueError, match="at least one pair"):
        match_metrics([], [])
    with pytest.raises(ValueError, match="NaN"):
        match_metrics([float("nan"), 1.0], [1, 0])


def test_compute_metrics_accepts_both_prediction_layouts():
    logits, labels = np.array(LOGITS, dtype=np.float32), np.array(LABELS)
    for predictions in (logits, logits[:, None], (logits[:, None], np.zeros((8, 4))), (logits,)):
        _assert_metrics(compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels)), EXPECTED)


def test_compute_metrics_leaves_out_an_undefined_auc():
    got = compute_metrics(EvalPrediction(predictions=np.array([1.0, -1.0]), label_ids=np.array([1, 1])))
    assert set(got) == {"accuracy", "precision", "recall", "f1"}
    assert all(isinstance(v, float) for v in got.values())


def test_scripts_import_only_installed_packages():
    # evaluate copies each script alone into its modules cache, where a relative import would not resolve: the
    # scripts compute with scikit-learn and share mmkd's binary check, both imported as installed packages.
    assert sorted(p.stem for p in METRIC_SCRIPTS.glob("[!_]*.py")) == sorted(METRICS)
    for name in METRICS:
        text = (METRIC_SCRIPTS / f"{name}.py").read_text()
        assert "from ." not in text and "import ." not in text, name
        assert "from sklearn.metrics import" in text, name
        assert "from mmkd.eval.metric_modules._binary import" in text, name


_LOADER = textwrap.dedent(
    """
    import socket

    attempts = []

    def _deny(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by the test")

    socket.socket.connect = _deny
    socket.socket.connect_ex = _deny
    socket.create_connection = _deny
    socket.getaddrinfo = _deny

    from mmkd.eval.match_metrics import METRICS, load_metric, match_metrics

    for name in METRICS:
        load_metric(name)
    print(sorted(match_metrics([2.0, 0.5, 0.5, 0.5, -1.0, -2.0, -1.0, -3.0], [1, 1, 1, 0, 1, 1, 0, 0]).items()))
    assert not attempts, attempts
    """
)


@pytest.mark.timeout(300)
def test_loads_without_network_or_offline_flags_from_concurrent_processes(tmp_path):
    # Two fresh processes load every script at the same time into the same empty modules cache, with the
    # offline variables unset and every socket connection refused: a Hub lookup would fail (or hang).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOADER], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip() == str(sorted(EXPECTED.items())), out
    for name in METRICS:  # copied once, under one content hash
        copies = list((tmp_path / "modules" / "evaluate_modules" / "metrics" / name).glob("*/" + name + ".py"))
        assert len(copies) == 1, copies
