"""Experiment templates: intervention windows, architecture screening, the feature formation map,
and alert-driven stopping for production monitoring.

>>> from dimscope.experiments import intervention, screen, FormationMap, StopOnAlert
"""

from __future__ import annotations

from ._training import ClassificationData, digits_data, per_class_accuracy, train_classifier
from .formation import FormationMap, first_decodable, ridge_decodability
from .intervention import InterventionResult, even_windows, intervention
from .monitor import StopOnAlert
from .screening import ScreenResult, early_scores, screen, spearman_bootstrap

__all__ = [
    "ClassificationData",
    "digits_data",
    "train_classifier",
    "per_class_accuracy",
    "intervention",
    "InterventionResult",
    "even_windows",
    "screen",
    "ScreenResult",
    "early_scores",
    "spearman_bootstrap",
    "FormationMap",
    "ridge_decodability",
    "first_decodable",
    "StopOnAlert",
]
