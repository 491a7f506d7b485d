"""Value checks shared by configs, models and losses: each raises ``ValueError`` with one line naming the value.

The ``*_check`` factories return predicates for the trainers' tables (:class:`mmkd.trainers.base.LossTerm` and the
configs' field checks): ``check(value) -> None | str``, the string saying what is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

Check = Callable[[Any], "str | None"]

#: ``owner/name`` as the Hub spells repository ids (models and datasets); anything else with a slash is a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ConfigError(ValueError):
    """A bad option: the recipes report it as one line, ``error: <option>=<value>: <why>``, with exit status 2
    (:func:`mmkd.args.config_errors`), before any model or dataset is loaded."""


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative(name: str, value: float) -> float:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


# -- predicates for tables ---------------------------------------------------------------------------------------
def one_of(*choices: str) -> Check:
    def check(value):
        return None if value in choices else f"choose one of {', '.join(choices)}"

    return check


def at_least(minimum: float) -> Check:
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok and value >= minimum else f"must be >= {minimum:g}"

    return check


def integer_at_least(minimum: int) -> Check:
    def check(value):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok and value >= minimum else f"must be an integer >= {minimum}"

    return check


def greater_than(bound: float) -> Check:
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok and value > bound else f"must be > {bound:g}"

    return check


def between(low: float, high: float) -> Check:
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok and low <= value <= high else f"must be in [{low:g}, {high:g}]"

    return check


def probability(value) -> str | None:
    """A probability of an event that happens: in (0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1
    return None if ok else "must be in (0, 1]"


def optional(check: Check) -> Check:
    """``check`` for a value that may also be ``None``."""

    def optional_check(value):
        return None if value is None else check(value)

    return optional_check


def run_checks(obj: Any, checks: dict[str, Check]) -> None:
    """Apply ``{field: check}`` to ``obj``'s attributes; the first failure raises ``ValueError`` naming the field."""
    for name, check in checks.items():
        value = getattr(obj, name)
        problem = check(value)
        if problem:
            raise ValueError(f"{name}={value!r}: {problem}")
