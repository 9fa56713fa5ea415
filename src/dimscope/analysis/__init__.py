"""Analyses of stored runs. Re-exports kept minimal so that several areas can add theirs."""

from __future__ import annotations

from .precursor import precursor_gap

__all__ = ["precursor_gap"]
