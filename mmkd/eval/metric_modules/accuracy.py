"""Accuracy of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

``evaluate`` copies this file into its modules cache and imports it from there (the Hub's own ``accuracy`` script
cannot be fetched without a network); the maths is scikit-learn's.
"""

import evaluate
from sklearn.metrics import accuracy_score

from mmkd.eval.metric_modules._binary import binary_metric_info, check_binary

_DESCRIPTION = """
Accuracy: the fraction of pairs whose predicted label equals the reference label, (TP + TN) / N
(sklearn.metrics.accuracy_score). Binary labels only: 1 = match (the positive class), 0 = mismatch.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> accuracy = evaluate.load("mmkd/eval/metric_modules/accuracy.py")
    >>> accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return binary_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references):
        predictions = check_binary("predictions", predictions)  # (N,)
        references = check_binary("references", references)  # (N,)
        if references.size == 0:
            raise ValueError("accuracy needs at least one example, got 0")
        return {"accuracy": float(accuracy_score(references, predictions))}
