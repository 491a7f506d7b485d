"""Binary-classification metrics as ``evaluate`` scripts shipped inside mmkd, so they load offline.

Each ``<name>.py`` here is an ``evaluate.Metric`` script computing with ``sklearn.metrics``, loaded by path
through :func:`mmkd.eval.match_metrics.load_metric`; ``_binary`` holds what they share. The package marker makes
setuptools ship the scripts.
"""
