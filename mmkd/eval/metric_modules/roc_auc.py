"""ROC-AUC of binary match scores: an ``evaluate`` metric script shipped with mmkd so it loads offline.

Self-contained on purpose (numpy only): ``evaluate`` copies this file into its modules cache and imports it from
there, and the Hub's own ``roc_auc`` script cannot be fetched without a network and needs scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
ROC-AUC: the area under the ROC curve of real-valued scores (logits or probabilities; any monotone transform gives
the same value), with the positive class 1 (pos_label=1). It is computed as the Mann-Whitney U statistic, the
probability that a random positive pair scores higher than a random negative one, ties counting 1/2:

    AUC = (sum of the positives' ranks − n_pos·(n_pos + 1)/2) / (n_pos·n_neg),

ranks being 1-based, tied scores sharing their average rank. This equals scikit-learn's roc_auc_score (the
trapezoidal area) exactly. With a single class among the references the AUC is undefined and None is returned
(scikit-learn raises instead).
"""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (`list` of `float`): scores, higher meaning more likely a match.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    roc_auc (`float` or `None`): in [0, 1]; None when the references hold only one class.
Examples:
    >>> roc_auc = evaluate.load("mmkd/matching/metric_modules/roc_auc.py")
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


def _check_binary(name: str, values: np.ndarray) -> np.ndarray:
    """Reject labels other than 0/1: a silent multi-class input would make every binary count wrong."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` (N,), tied values sharing the mean of the ranks they span."""
    order = np.argsort(scores, kind="mergesort")  # (N,)
    sorted_scores = scores[order]  # (N,)
    # On a sorted array, return_index gives each tie group's first position and return_counts its size.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)  # (G,) each
    group_ranks = first + (counts + 1) / 2.0  # (G,) mean of the 1-based ranks first+1 .. first+count
    ranks = np.empty(scores.shape[0], dtype=np.float64)  # (N,)
    ranks[order] = np.repeat(group_ranks, counts)
    return ranks


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RocAuc(evaluate.Metric):  # evaluate derives the name "roc_auc" from the class name
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64: float32 scores could round distinct logits into ties and change the AUC.
            features=datasets.Features(
                {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            format="numpy",
        )

    def _compute(self, prediction_scores, references):
        references = _check_binary("references", references)  # (N,)
        scores = np.asarray(prediction_scores, dtype=np.float64).reshape(-1)  # (N,)
        if np.isnan(scores).any():
            raise ValueError(f"prediction_scores contain NaN at positions {np.flatnonzero(np.isnan(scores))[:10]}")
        n_pos = int(np.sum(references == 1))
        n_neg = int(references.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            return {"roc_auc": None}
        ranks = _average_ranks(scores)  # (N,)
        u_statistic = ranks[references == 1].sum() - n_pos * (n_pos + 1) / 2.0
        return {"roc_auc": float(u_statistic / (n_pos * n_neg))}
