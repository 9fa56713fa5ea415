"""Argument checks that raise errors naming the parameter, the constraint and the value."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def _owner(owner: str | None) -> str:
    return f" of {owner}" if owner else ""


def check_int(value: Any, name: str, *, min_value: int | None = None, owner: str | None = None) -> int:
    """Return ``value`` as an int, or raise ``ValueError``/``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bound = f" >= {min_value}" if min_value is not None else ""
        raise TypeError(f"The '{name}' parameter{_owner(owner)} must be an int{bound}. Got {value!r} instead.")
    if min_value is not None and value < min_value:
        raise ValueError(
            f"The '{name}' parameter{_owner(owner)} must be an int >= {min_value}. Got {value!r} instead."
        )
    return int(value)


def check_float(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    owner: str | None = None,
) -> float:
    """Return ``value`` as a float within the given bounds, or raise naming ``name``."""
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high}")
    constraint = "a float" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"The '{name}' parameter{_owner(owner)} must be {constraint}. Got {value!r} instead.")
    v = float(value)
    ok = v == v  # not NaN
    if ok and low is not None:
        ok = v >= low if low_inclusive else v > low
    if ok and high is not None:
        ok = v <= high if high_inclusive else v < high
    if not ok:
        raise ValueError(f"The '{name}' parameter{_owner(owner)} must be {constraint}. Got {value!r} instead.")
    return v


def check_bool(value: Any, name: str, *, owner: str | None = None) -> bool:
    """Return ``value`` if it is a bool (numpy's included), else raise ``TypeError`` naming ``name``
    (a string such as "no" would otherwise read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"The '{name}' parameter{_owner(owner)} must be True or False. Got {value!r} instead.")
    return bool(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str], *, owner: str | None = None) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming ``name``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"The '{name}' parameter{_owner(owner)} must be one of {opts}. Got {value!r} instead.")
    return value


def parse_ints(text: str, name: str, *, owner: str | None = None) -> tuple[int, ...]:
    """Comma-separated ints (a CLI option such as ``--seeds 0,1,2``), at least one, or a
    ``ValueError`` naming the option."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"The '{name}' parameter{_owner(owner)} must be comma-separated ints. Got {text!r} instead.")
    return values
