"""Accuracy of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

Self-contained on purpose (numpy only): ``evaluate`` copies this file into its modules cache and imports it from
there, and the Hub's own ``accuracy`` script cannot be fetched without a network and needs scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy: the fraction of pairs whose predicted label equals the reference label, (TP + TN) / N.
Binary labels only: 1 = match (the positive class), 0 = mismatch.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> accuracy = evaluate.load("mmkd/matching/metric_modules/accuracy.py")
    >>> accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75}
"""


def _check_binary(name: str, values: np.ndarray) -> np.ndarray:
    """Reject labels other than 0/1: a silent multi-class input would make every binary count wrong."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references):
        predictions = _check_binary("predictions", predictions)  # (N,)
        references = _check_binary("references", references)  # (N,)
        if references.size == 0:
            raise ValueError("accuracy needs at least one example, got 0")
        return {"accuracy": float(np.mean(predictions == references))}
