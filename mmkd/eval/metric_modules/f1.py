"""F1 of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

``evaluate`` copies this file into its modules cache and imports it from there (the Hub's own ``f1`` script
cannot be fetched without a network); the maths is scikit-learn's.
"""

import evaluate
from sklearn.metrics import f1_score

from mmkd.eval.metric_modules._binary import binary_metric_info, check_binary

_DESCRIPTION = """
F1: the harmonic mean of precision and recall, 2·P·R / (P + R) = 2·TP / (2·TP + FP + FN), with the positive
class 1 (sklearn.metrics.f1_score, pos_label=1). When TP + FP + FN = 0 (no positive predicted nor present) it is
0 (zero_division=0).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    f1 (`float`): in [0, 1].
Examples:
    >>> f1 = evaluate.load("mmkd/eval/metric_modules/f1.py")
    >>> f1.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'f1': 0.8}
"""

_CITATION = """
@book{vanrijsbergen1979information,
  title     = {Information Retrieval},
  author    = {van Rijsbergen, C. J.},
  edition   = {2nd},
  publisher = {Butterworths},
  year      = {1979}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return binary_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references):
        predictions = check_binary("predictions", predictions)  # (N,)
        references = check_binary("references", references)  # (N,)
        return {"f1": float(f1_score(references, predictions, pos_label=1, zero_division=0))}
