"""ROC-AUC of binary match scores: an ``evaluate`` metric script shipped with mmkd so it loads offline.

``evaluate`` copies this file into its modules cache and imports it from there (the Hub's own ``roc_auc`` script
cannot be fetched without a network); the maths is scikit-learn's.
"""

import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

from mmkd.eval.metric_modules._binary import binary_metric_info, check_binary

_DESCRIPTION = """
ROC-AUC: the area under the ROC curve of real-valued scores (logits or probabilities; any monotone transform gives
the same value), with the positive class 1 (sklearn.metrics.roc_auc_score). It equals the probability that a
random positive pair scores higher than a random negative one, ties counting 1/2 (the Mann-Whitney U statistic
over n_pos·n_neg). With a single class among the references the AUC is undefined and None is returned
(scikit-learn raises instead).
"""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (`list` of `float`): scores, higher meaning more likely a match.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    roc_auc (`float` or `None`): in [0, 1]; None when the references hold only one class.
Examples:
    >>> roc_auc = evaluate.load("mmkd/eval/metric_modules/roc_auc.py")
    >>> roc_auc.compute(prediction_scores=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])
    {'roc_auc': 0.75}
"""

_CITATION = """
@article{hanley1982meaning,
  title   = {The Meaning and Use of the Area under a Receiver Operating Characteristic ({ROC}) Curve},
  author  = {Hanley, James A. and McNeil, Barbara J.},
  journal = {Radiology},
  volume  = {143},
  number  = {1},
  pages   = {29--36},
  year    = {1982}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RocAuc(evaluate.Metric):  # evaluate derives the name "roc_auc" from the class name
    def _info(self):
        return binary_metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION, scores=True)

    def _compute(self, prediction_scores, references):
        references = check_binary("references", references)  # (N,)
        scores = np.asarray(prediction_scores, dtype=np.float64).reshape(-1)  # (N,)
        if np.isnan(scores).any():
            raise ValueError(f"prediction_scores contain NaN at positions {np.flatnonzero(np.isnan(scores))[:10]}")
        if np.unique(references).size < 2:
            return {"roc_auc": None}
        return {"roc_auc": float(roc_auc_score(references, scores))}
