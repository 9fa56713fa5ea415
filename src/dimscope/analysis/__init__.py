"""Analyses of stored runs: correlations with training signals, and ``analyze_run`` (phases,
significant transitions, noise floors, convention sensitivity). Imports are lazy so that sibling
modules of this package (e.g. other areas' reports) stay cheap to import."""

from __future__ import annotations

from typing import Any

__all__ = ["analyze_run", "Analysis", "correlations", "correlate", "spearman_interval", "lead_lag"]

_LAZY = {
    "analyze_run": "analyze",
    "Analysis": "analyze",
    "correlations": "correlation",
    "correlate": "correlation",
    "spearman_interval": "correlation",
    "lead_lag": "correlation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
