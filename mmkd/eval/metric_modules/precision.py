"""Precision of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

Self-contained on purpose (numpy only): ``evaluate`` copies this file into its modules cache and imports it from
there, and the Hub's own ``precision`` script cannot be fetched without a network and needs scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Precision: of the pairs predicted to match, the fraction that do, TP / (TP + FP), with the positive class 1
(pos_label=1). When nothing is predicted positive (TP + FP = 0) it is 0 (zero_division=0), as scikit-learn does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    precision (`float`): in [0, 1].
Examples:
    >>> precision = evaluate.load("mmkd/matching/metric_modules/precision.py")
    >>> precision.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'precision': 0.6666666666666666}
"""


def _check_binary(name: str, values: np.ndarray) -> np.ndarray:
    """Reject labels other than 0/1: a silent multi-class input would make every binary count wrong."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(evaluate.Metric):
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
        tp = int(np.sum((predictions == 1) & (references == 1)))
        predicted_positive = int(np.sum(predictions == 1))  # TP + FP
        return {"precision": tp / predicted_positive if predicted_positive else 0.0}
