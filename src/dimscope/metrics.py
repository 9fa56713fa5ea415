"""Dimensionality metrics: pure functions of a :class:`~dimscope.spectrum.Spectrum`.

The definitions (λ: covariance eigenvalues, descending; σ_i = √λ_i):

==========================  ==================================================  =====================
name                        formula                                             note
==========================  ==================================================  =====================
``stable_rank``             Σλ / λ_1                                            ‖X‖_F² / ‖X‖_2²
``participation_ratio``     (Σλ)² / Σλ²                                         eigenvalues
``effective_rank``          exp(−Σ p_i log p_i), p = λ / Σλ                     Roy & Vetterli
``rankme``                  exp(−Σ p_i log p_i), p_i = σ_i / Σσ + 1e-7          Garrido et al. 2023
``eps_rank``                #{λ_i > ε·λ_1} (relative) or #{λ_i > ε} (absolute)  ε = 1e-3 relative
``energy_rank``             smallest k with Σ_{i≤k} λ_i ≥ q·Σλ                  q = 0.9
``nuclear_ratio``           Σσ / σ_1
==========================  ==================================================  =====================

A spectrum that is all zeros (constant features) has every metric equal to 0.

The ``ndt_*`` functions reproduce ndtracker's conventions for comparison only: they take the
*uncentered* spectrum and ndtracker's "participation ratio", which uses singular values
((Σσ)² / Σσ²) instead of eigenvalues. They are never the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ._validation import check_float
from .spectrum import Spectrum, spectrum

__all__ = [
    "stable_rank",
    "participation_ratio",
    "effective_rank",
    "rankme",
    "eps_rank",
    "energy_rank",
    "nuclear_ratio",
    "METRICS",
    "DEFAULT_METRICS",
    "DEFINITIONS",
    "compute_metrics",
    "measure",
    "ndt_participation_ratio",
    "NDT_METRICS",
    "measure_ndt",
]

RANKME_EPS = 1e-7


def _values(s: Spectrum) -> np.ndarray:
    if not isinstance(s, Spectrum):
        raise TypeError(f"Expected a dimscope Spectrum, got {type(s).__name__}. Use dimscope.spectrum(X) first.")
    return s.values


def stable_rank(s: Spectrum) -> float:
    """Σλ / λ_1 (= ‖X‖_F² / ‖X‖_2²)."""
    v = _values(s)
    if len(v) == 0 or v[0] <= 0:
        return 0.0
    return float(s.trace / v[0])


def participation_ratio(s: Spectrum) -> float:
    """(Σλ)² / Σλ² over the eigenvalues."""
    v = _values(s)
    sq = float(np.dot(v, v))
    if sq <= 0:
        return 0.0
    return float(v.sum() ** 2 / sq)


def _entropy_exp(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(s: Spectrum) -> float:
    """exp of the Shannon entropy of p = λ / Σλ (Roy & Vetterli 2007, on the covariance spectrum)."""
    v = _values(s)
    total = v.sum()
    if total <= 0:
        return 0.0
    return _entropy_exp(v / total)


def rankme(s: Spectrum) -> float:
    """RankMe (Garrido et al. 2023): exp entropy of p_i = σ_i / Σσ + 1e-7, σ_i = √λ_i."""
    sv = np.sqrt(_values(s))
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv / total + RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def eps_rank(s: Spectrum, eps: float = 1e-3, relative: bool = True) -> float:
    """#{λ_i > ε·λ_1} if ``relative`` else #{λ_i > ε}."""
    eps = check_float(eps, "eps", low=0.0, owner="eps_rank")
    v = _values(s)
    if len(v) == 0 or v[0] <= 0:
        return 0.0
    thr = eps * v[0] if relative else eps
    return float(np.count_nonzero(v > thr))


def energy_rank(s: Spectrum, q: float = 0.9) -> float:
    """The smallest k with Σ_{i≤k} λ_i ≥ q·Σλ ("cumulative energy 90" for q = 0.9)."""
    q = check_float(q, "q", low=0.0, high=1.0, low_inclusive=False, owner="energy_rank")
    v = _values(s)
    total = s.trace
    if len(v) == 0 or total <= 0:
        return 0.0
    cs = np.cumsum(v)
    k = int(np.searchsorted(cs, q * total * (1.0 - 1e-12), side="left")) + 1
    return float(min(k, len(v)))


def nuclear_ratio(s: Spectrum) -> float:
    """Σσ / σ_1."""
    sv = np.sqrt(_values(s))
    if len(sv) == 0 or sv[0] <= 0:
        return 0.0
    return float(sv.sum() / sv[0])


MetricFn = Callable[..., float]

#: Every metric by name. Parameterised metrics take keyword arguments (eps, relative, q).
METRICS: dict[str, MetricFn] = {
    "stable_rank": stable_rank,
    "participation_ratio": participation_ratio,
    "effective_rank": effective_rank,
    "rankme": rankme,
    "eps_rank": eps_rank,
    "energy_rank": energy_rank,
    "nuclear_ratio": nuclear_ratio,
}

DEFAULT_METRICS: tuple[str, ...] = tuple(METRICS)

#: The formulas, stored in every run's manifest and printed in the report.
DEFINITIONS: dict[str, str] = {
    "stable_rank": "sum(lambda) / lambda_1",
    "participation_ratio": "(sum lambda)^2 / sum(lambda^2)",
    "effective_rank": "exp(-sum p log p), p = lambda / sum(lambda)",
    "rankme": "exp(-sum p log p), p = sigma / sum(sigma) + 1e-7, sigma = sqrt(lambda)",
    "eps_rank": "#{lambda_i > eps * lambda_1} (relative) or #{lambda_i > eps} (absolute)",
    "energy_rank": "smallest k with sum_{i<=k} lambda_i >= q * sum(lambda)",
    "nuclear_ratio": "sum(sigma) / sigma_1",
}


def _normalize_metric_spec(metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    if metrics is None:
        return {m: {} for m in DEFAULT_METRICS}
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = [(k, dict(v or {})) for k, v in metrics.items()]
    else:
        items = [(m, {}) for m in metrics]
    out: dict[str, dict[str, Any]] = {}
    for name, params in items:
        if name not in METRICS:
            import difflib

            close = difflib.get_close_matches(str(name), METRICS, n=3)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ValueError(
                f"The 'metrics' parameter names an unknown metric {name!r}. Known: {', '.join(METRICS)}.{hint}"
            )
        out[name] = params
    return out


def compute_metrics(s: Spectrum, metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Every requested metric of one spectrum (all of them by default)."""
    spec = _normalize_metric_spec(metrics)
    return {name: METRICS[name](s, **params) for name, params in spec.items()}


def measure(X: Any, metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None, center: bool = True) -> dict[str, float]:
    """Spectrum of ``X`` (one eigendecomposition) and every requested metric of it."""
    return compute_metrics(spectrum(X, center=center), metrics)


# --- ndtracker's conventions, for comparison only --------------------------------------------------


def ndt_participation_ratio(s: Spectrum) -> float:
    """ndtracker's "participation ratio": (Σσ)² / Σσ² over *singular values* σ = √λ."""
    sv = np.sqrt(_values(s))
    sq = float(np.dot(sv, sv))
    if sq <= 0:
        return 0.0
    return float(sv.sum() ** 2 / sq)


NDT_METRICS: dict[str, MetricFn] = {
    "stable_rank": stable_rank,
    "participation_ratio": ndt_participation_ratio,
    "cumulative_90": lambda s: energy_rank(s, 0.9),
    "nuclear_norm_ratio": nuclear_ratio,
}


def measure_ndt(X: Any) -> dict[str, float]:
    """ndtracker's four metrics on ``X`` under its conventions: uncentered, σ-based "PR"."""
    s = spectrum(X, center=False)
    return {name: fn(s) for name, fn in NDT_METRICS.items()}
