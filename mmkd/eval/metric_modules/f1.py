"""F1 of binary match predictions: an ``evaluate`` metric script shipped with mmkd so it loads offline.

Self-contained on purpose (numpy only): ``evaluate`` copies this file into its modules cache and imports it from
there, and the Hub's own ``f1`` script cannot be fetched without a network and needs scikit-learn.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1: the harmonic mean of precision and recall, 2·P·R / (P + R) = 2·TP / (2·TP + FP + FN), with the positive
class 1 (pos_label=1). When TP + FP + FN = 0 (no positive predicted nor present) it is 0 (zero_division=0), as
scikit-learn does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, 0 or 1.
    references (`list` of `int`): true labels, 0 or 1.
Returns:
    f1 (`float`): in [0, 1].
Examples:
    >>> f1 = evaluate.load("mmkd/matching/metric_modules/f1.py")
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


def _check_binary(name: str, values: np.ndarray) -> np.ndarray:
    """Reject labels other than 0/1: a silent multi-class input would make every binary count wrong."""
    values = np.asarray(values).reshape(-1)
    bad = np.setdiff1d(np.unique(values), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must be binary (0 or 1), got values {bad.tolist()[:10]}")
    return values.astype(np.int64)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
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
        fp = int(np.sum((predictions == 1) & (references == 0)))
        fn = int(np.sum((predictions == 0) & (references == 1)))
        # 2TP / (2TP + FP + FN) equals 2PR / (P + R) and needs no special case when P + R = 0 but TP + FP + FN > 0.
        denominator = 2 * tp + fp + fn
        return {"f1": 2 * tp / denominator if denominator else 0.0}
