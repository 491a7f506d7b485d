"""The one Markdown table writer of mmkd's results files, and the number formats they share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["fmt", "markdown_table", "pct"]


def fmt(value: float | None, spec: str = ".2f") -> str:
    """``format(value, spec)``, or ``"n/a"`` for a figure that could not be computed (``None``)."""
    return "n/a" if value is None else format(value, spec)


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage without the sign (``0.8252`` -> ``"82.52"``); ``None`` -> ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table: ``header`` cells, then one line per row (cells formatted with ``str``)."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a table row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
