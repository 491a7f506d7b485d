"""Precision of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

``evaluate`` copies this file into its modules cache and imports it from there (the Hub's own ``precision``
script cannot be fetched without a network); the maths is scikit-learn's.
"""

import evaluate
from sklearn.metrics import precision_score

from mmkd.eval.metric_modules._binary import binary_metric_info, check_binary

_DESCRIPTION = """
Precision: of the pairs predicted to match, the fraction that do, TP / (TP + FP), with the positive class 1
(sklearn.metrics.precision_score, pos_label=1). When nothing is predicted positive (TP + FP = 0) it is 0
(zero_division=0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    precision (`float`): in [0, 1].
Examples:
    >>> precision = evaluate.load("mmkd/eval/metric_modules/precision.py")
    >>> precision.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'precision': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(evaluate.Metric):
    def _info(self):
        return binary_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        predictions = check_binary("predictions", predictions)  # (N,)
        references = check_binary("references", references)  # (N,)
        return {"precision": float(precision_score(references, predictions, pos_label=1, zero_division=0))}
