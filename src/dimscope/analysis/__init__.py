"""Analyses of stored runs: correlations with training signals, ``analyze_run`` (phases,
significant transitions, noise floors, convention sensitivity) and ``precursor_gap`` (geometry
before behaviour). Imports are lazy so that sibling modules of this package (e.g. other areas'
reports) stay cheap to import."""

from __future__ import annotations

from typing import Any

__all__ = ["analyze_run", "Analysis", "correlations", "correlate", "spearman_interval", "lead_lag", "precursor_gap"]

_LAZY = {
    "analyze_run": "analyze",
    "Analysis": "analyze",
    "correlations": "correlation",
    "correlate": "correlation",
    "spearman_interval": "correlation",
    "lead_lag": "correlation",
    "precursor_gap": "precursor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
