"""The training Jacobian: chaotic, bulk and stable subspaces of parameter space (REFERENCE.md section 1)."""

from __future__ import annotations

from .core import Regions, TrainingJacobian, UnrolledTraining, training_jacobian
from .paper import PAPER_TRAINING, digits_data, paper_model
from .training import TrainConfig, functional_train

__all__ = [
    "training_jacobian",
    "TrainingJacobian",
    "Regions",
    "UnrolledTraining",
    "TrainConfig",
    "functional_train",
    "digits_data",
    "paper_model",
    "PAPER_TRAINING",
]
