"""ε-rank and the staircase (Yang, Zhao & Zhu, arXiv 2412.05144).

* :func:`eps_rank_function_space` — the function-space ε-rank of a layer on a quadrature
  (:mod:`dimscope.staircase.epsrank`), and :class:`FunctionSpaceEpsRank`, the Tracker extension;
* :func:`analyze_staircase` — loss drops vs ε-rank steps, coincidence, per-layer ordering;
* :func:`pretrain_first_layer` — structured first-layer initialization / ε-rank pre-training;
* :func:`run_staircase` — the reproduction behind ``dimscope staircase``.
"""

from __future__ import annotations

from .epsrank import (
    EpsRank,
    FunctionSpaceEpsRank,
    Quadrature,
    eps_rank_function_space,
    gauss_legendre,
    gram_eigenvalues,
    monte_carlo,
    quadrature,
    trapezoid,
)
from .analysis import StaircaseResult, analyze_staircase, coincidence, eps_rank_steps, find_rises, loss_drops
from .pretrain import PretrainResult, pretrain_first_layer
from .recipe import run_staircase

__all__ = [
    "EpsRank",
    "FunctionSpaceEpsRank",
    "Quadrature",
    "eps_rank_function_space",
    "gauss_legendre",
    "gram_eigenvalues",
    "monte_carlo",
    "quadrature",
    "trapezoid",
    "StaircaseResult",
    "analyze_staircase",
    "coincidence",
    "eps_rank_steps",
    "find_rises",
    "loss_drops",
    "PretrainResult",
    "pretrain_first_layer",
    "run_staircase",
]
