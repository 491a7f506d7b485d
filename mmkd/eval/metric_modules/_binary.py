"""What the shipped metric scripts share: the 0/1 check and their ``evaluate.MetricInfo``.

The scripts import this as an installed module (``evaluate`` copies each script alone into its modules cache,
where a relative import would not resolve). It defines no ``EvaluationModule`` subclass, so importing from it
leaves each script's own metric class the one ``evaluate`` picks.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

__all__ = ["binary_metric_info", "check_binary"]


def check_binary(name: str, values) -> np.ndarray:
    """``values`` flattened to int64 0/1; anything else is rejected (a silent multi-class input would make
    every binary count wrong)."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


def binary_metric_info(description: str, inputs_description: str, citation: str = "",
                       scores: bool = False) -> evaluate.MetricInfo:
    """Info of a metric on 0/1 ``references`` and 0/1 ``predictions`` or, with ``scores``, float64
    ``prediction_scores`` (float32 could round distinct logits into ties and change an AUC)."""
    if scores:
        features = {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int32")}
    else:
        features = {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(features),
        format="numpy",
    )
