"""Two-parameter grids of training runs (the match recipe's α × T sweep, the CLIP studies' α × T and affinity
weight × temperature grids): run every cell, then write ``<stem>.md`` (the metric per cell), ``<stem>.json`` (every
run) and ``<stem>.png`` (the heatmap) -- one implementation for every recipe.

    rows = run_grid(lambda a, t: train_and_evaluate(alpha=a, temperature=t), alphas, temperatures,
                    keys=("alpha", "temperature"))
    write_grid(out, rows, Grid("alpha", alphas, "temperature", temperatures, metric="f1"), title="...")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmkd.reporting.tables import markdown_table, pct

__all__ = ["Grid", "grid_values", "parse_values", "run_grid", "write_grid"]


@dataclass(frozen=True)
class Grid:
    """The grid's row parameter and values, its column parameter and values, and the metric a cell shows (a key
    of each run's row, a fraction). ``row_label`` / ``col_label``: the axes' names (default the keys)."""

    row_key: str
    row_values: Sequence[float]
    col_key: str
    col_values: Sequence[float]
    metric: str
    row_label: str | None = None
    col_label: str | None = None
    metric_label: str | None = None  # the colour bar's (default "validation <metric> (%)")


def parse_values(option: str, value: str) -> list[float]:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]``; a ``ValueError`` naming ``option`` otherwise."""
    try:
        values = [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{option}={value}: a comma-separated list of numbers")
    return values


def run_grid(run: Callable[[float, float], dict[str, Any]], row_values: Sequence[float],
             col_values: Sequence[float], keys: tuple[str, str]) -> list[dict[str, Any]]:
    """``run(row value, column value)`` for every cell, rows first; each result gains the two values under
    ``keys``."""
    return [{**run(r, c), keys[0]: r, keys[1]: c} for r in row_values for c in col_values]


def grid_values(rows: list[dict[str, Any]], grid: Grid) -> np.ndarray:
    """The ``(rows, columns)`` array of the metric (``nan`` where a cell has no run or no value)."""
    def cell(r, c):
        found = [x for x in rows if x.get(grid.row_key) == r and x.get(grid.col_key) == c]
        value = found[0].get(grid.metric) if found else None
        return np.nan if value is None else float(value)

    return np.array([[cell(r, c) for c in grid.col_values] for r in grid.row_values], dtype=float)


def write_grid(out: str | Path, rows: list[dict[str, Any]], grid: Grid, title: str, stem: str = "sweep",
               extra: dict[str, Any] | None = None) -> np.ndarray:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` in ``out``; returns the grid's array."""
    from mmkd.reporting.plots import sweep_heatmap

    out = Path(out)
    values = grid_values(rows, grid)
    row_label, col_label = grid.row_label or grid.row_key, grid.col_label or grid.col_key
    table = markdown_table([f"{row_label} \\ {col_label}", *(f"{c:g}" for c in grid.col_values)],
                           [(f"{r:g}", *(pct(None if np.isnan(v) else v) for v in line))
                            for r, line in zip(grid.row_values, values, strict=True)])
    (out / f"{stem}.md").write_text(f"# {title}\n\n{table}\n")
    record = {"metric": grid.metric, grid.row_key: list(grid.row_values), grid.col_key: list(grid.col_values),
              **(extra or {}), "runs": rows}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    sweep_heatmap(values, list(grid.row_values), list(grid.col_values), grid.metric, out / f"{stem}.png",
                  row_label=row_label, col_label=col_label, metric_label=grid.metric_label)
    return values
