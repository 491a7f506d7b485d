"""Evaluation metrics of a binary image-text matcher, loaded through ``evaluate`` without a network.

Research 000 reports accuracy, precision, recall and F1 (Table 1); ROC-AUC is added because it judges the logits
themselves, independently of the threshold at 0. The metric scripts ship inside mmkd
(:mod:`mmkd.eval.metric_modules`, computing with ``sklearn.metrics``) and are loaded by file path:
``evaluate.load("accuracy")`` would fetch the Hub's script, which fails offline, whereas a path to an existing
``.py`` file is loaded locally without any network call, whatever ``HF_HUB_OFFLINE`` / ``HF_EVALUATE_OFFLINE``
say. ``evaluate`` copies
the script into its modules cache (``HF_MODULES_CACHE``) under a hash of its content, guarded by a file lock, so
concurrent processes can load them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch

from mmkd.eval.metric_modules._binary import check_binary

__all__ = ["METRICS", "METRIC_SCRIPTS", "compute_metrics", "load_metric", "match_metrics"]

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")

METRIC_SCRIPTS = Path(__file__).resolve().parent / "metric_modules"


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of the shipped :data:`METRICS` as an ``evaluate`` module, offline.

    ``roc_auc`` takes ``prediction_scores`` and ``references``; the others ``predictions`` and ``references``,
    all binary with 1 = match. ``load_kwargs`` go to :func:`evaluate.load` (e.g. ``keep_in_memory=True``,
    ``experiment_id``, ``num_process``/``process_id`` for distributed evaluation).
    """
    if name not in METRICS:
        raise ValueError(f"unknown match metric {name!r}; expected one of {METRICS}")
    # The full path to the .py file: a bare name would go to the Hub first.
    return evaluate.load(str(METRIC_SCRIPTS / f"{name}.py"), **load_kwargs)


@functools.cache
def _cached_metric(name: str) -> evaluate.EvaluationModule:
    """One in-memory instance per metric for :func:`match_metrics`: ``compute`` with all the data resets it, and
    keeping it in memory writes no Arrow files, so repeated evaluations neither re-copy scripts nor touch disk."""
    return load_metric(name, keep_in_memory=True)


def _to_numpy(name: str, x: Any) -> np.ndarray:
    """A ``(B,)`` or ``(B, 1)`` array-like or tensor -> ``(B,)`` numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x  # numpy has no bfloat16
        x = x.numpy()
    array = np.asarray(x)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # (B,)
    if array.ndim != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) (one value per pair), got {array.shape}")
    return array


def match_metrics(logits: Any, labels: Any, threshold: float = 0.0) -> dict[str, float | None]:
    """Accuracy, precision, recall, F1 and ROC-AUC of a binary matcher's logits.

    Args:
        logits: ``(B,)`` or ``(B, 1)`` array-like or tensor of logits (any real-valued score works).
        labels: ``(B,)`` or ``(B, 1)`` references, 1 = match, 0 = mismatch, of any dtype.
        threshold: a pair is predicted to match when its logit is ``> threshold``; 0 is probability 0.5.

    Returns:
        ``{name: value}`` for every name of :data:`METRICS`, fractions in [0, 1]. Precision, recall and F1 with
        positive class 1 and 0 on a zero division. ``roc_auc`` uses the logits as scores and is ``None`` when the
        labels hold one class only (the AUC is undefined then).
    """
    scores = _to_numpy("logits", logits).astype(np.float64)  # (B,)
    references = check_binary("labels", _to_numpy("labels", labels))  # (B,) int64 0/1, of any dtype
    if scores.shape != references.shape:
        raise ValueError(f"logits and labels must cover the same pairs, got shapes {scores.shape} and "
                         f"{references.shape}")
    if scores.size == 0:
        raise ValueError("match_metrics needs at least one pair, got 0")
    if np.isnan(scores).any():
        raise ValueError(f"logits contain {int(np.isnan(scores).sum())} NaN value(s)")
    predictions = (scores > threshold).astype(np.int64)  # (B,)
    results: dict[str, float | None] = {}
    for name in METRICS:
        if name == "roc_auc":
            out = _cached_metric(name).compute(prediction_scores=scores, references=references)
        else:
            out = _cached_metric(name).compute(predictions=predictions, references=references)
        results[name] = None if out[name] is None else float(out[name])
    return results


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``transformers.Trainer(compute_metrics=...)`` hook: :func:`match_metrics` of the evaluation logits.

    ``eval_pred.predictions`` is the logits array or a tuple whose first element is it (a model returning more
    outputs), of shape ``(B,)`` or ``(B, 1)``; ``eval_pred.label_ids`` holds the 0/1 labels. An undefined
    ``roc_auc`` (single-class evaluation set) is left out rather than returned as ``None``, so every logged value
    is a float, as the Trainer's loggers expect.
    """
    predictions = eval_pred.predictions
    if isinstance(predictions, (tuple, list)):
        if not predictions:
            raise ValueError("eval_pred.predictions is an empty tuple; expected the logits first")
        predictions = predictions[0]
    metrics = match_metrics(predictions, eval_pred.label_ids)
    return {name: value for name, value in metrics.items() if value is not None}
