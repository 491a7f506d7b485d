"""Binary-classification metrics as ``evaluate`` scripts shipped inside mmkd, so they load offline.

Each ``<name>.py`` here is a self-contained ``evaluate.Metric`` script (numpy only, no scikit-learn), loaded by path
through :func:`mmkd.eval.match_metrics.load_metric`. The package marker makes setuptools ship the scripts.
"""
