"""Recall of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

``evaluate`` copies this file into its modules cache and imports it from there (the Hub's own ``recall`` script
cannot be fetched without a network); the maths is scikit-learn's.
"""

import evaluate
from sklearn.metrics import recall_score

from mmkd.eval.metric_modules._binary import binary_metric_info, check_binary

_DESCRIPTION = """
Recall: of the pairs that match, the fraction predicted to match, TP / (TP + FN), with the positive class 1
(sklearn.metrics.recall_score, pos_label=1). When there is no positive reference (TP + FN = 0) it is 0
(zero_division=0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    recall (`float`): in [0, 1].
Examples:
    >>> recall = evaluate.load("mmkd/eval/metric_modules/recall.py")
    >>> recall.compute(predictions=[1, 0, 0, 1], references=[1, 0, 1, 1])
    {'recall': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Recall(evaluate.Metric):
    def _info(self):
        return binary_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        predictions = check_binary("predictions", predictions)  # (N,)
        references = check_binary("references", references)  # (N,)
        return {"recall": float(recall_score(references, predictions, pos_label=1, zero_division=0))}
