"""Transitions you can trust: detectors with measured false-positive rates, noise floors, phases."""

from __future__ import annotations

from .detectors import Cusum, Pelt, ZScore, jump_scores, make_detector
from .fixtures import Fixture, fixture_from_run, ndtracker_battery, standard_battery
from .validity import ValidityReport, validate

__all__ = [
    "ZScore",
    "Pelt",
    "Cusum",
    "make_detector",
    "jump_scores",
    "Fixture",
    "standard_battery",
    "ndtracker_battery",
    "fixture_from_run",
    "validate",
    "ValidityReport",
]
