"""Recall of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

Self-contained on purpose (numpy only): ``evaluate`` copies this file into its modules cache and imports it from
there, and the Hub's own ``recall`` script cannot be fetched without a network and needs scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Recall: of the pairs that match, the fraction predicted to match, TP / (TP + FN), with the positive class 1
(pos_label=1). When there is no positive reference (TP + FN = 0) it is 0 (zero_division=0), as scikit-learn does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    recall (`float`): in [0, 1].
Examples:
    >>> recall = evaluate.load("mmkd/matching/metric_modules/recall.py")
    >>> recall.compute(predictions=[1, 0, 0, 1], references=[1, 0, 1, 1])
    {'recall': 0.6666666666666666}
"""


def _check_binary(name: str, values: np.ndarray) -> np.ndarray:
    """Reject labels other than 0/1: a silent multi-class input would make every binary count wrong."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(evaluate.Metric):
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
        actual_positive = int(np.sum(references == 1))  # TP + FN
        return {"recall": tp / actual_positive if actual_positive else 0.0}
