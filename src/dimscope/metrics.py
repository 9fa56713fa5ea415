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

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ._validation import check_bool, check_float
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
    "check_metric_spec",
    "compute_metrics",
    "metric_params",
    "compute_metrics_batch",
    "moment_metrics",
    "MOMENT_METRICS",
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


# --- the formulas, once: each kernel takes K spectra at once -----------------------------------------
# V is a (K, m) float64 array of descending, non-negative eigenvalues (one spectrum per row, m >= 0);
# tr is the (K,) array of their traces (Σλ over *all* eigenvalues, which differs from V.sum(1) only
# for truncated spectra). Each returns a (K,) float64 array; a spectrum of all zeros gives 0.


def _top(V: np.ndarray) -> np.ndarray:
    return V[:, 0] if V.shape[1] else np.zeros(V.shape[0])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den <= 0 (a NaN stays NaN)."""
    zero = den <= 0
    with np.errstate(invalid="ignore"):
        return np.where(zero, 0.0, num / np.where(zero, 1.0, den))


def stable_rank_from_moments(trace: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Stable rank from tr C and λ_1 (no spectrum needed)."""
    return _ratio(trace, top)


def participation_ratio_from_moments(trace: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
    """Participation ratio from tr C and tr C² = Σλ² = ‖C‖_F² (no spectrum needed)."""
    return _ratio(trace**2, sum_sq)


def _stable_rank_k(V: np.ndarray, tr: np.ndarray) -> np.ndarray:
    return stable_rank_from_moments(tr, _top(V))


def _participation_ratio_k(V: np.ndarray, tr: np.ndarray) -> np.ndarray:
    top = _top(V)
    U = V / np.where(top > 0, top, 1.0)[:, None]  # scale-free: (Σλ)² and Σλ² neither overflow nor underflow
    return participation_ratio_from_moments(U.sum(axis=1), np.einsum("ij,ij->i", U, U))


def _exp_entropy(P: np.ndarray) -> np.ndarray:
    """exp(−Σ p log p) over each row, terms with p <= 0 left out."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P <= 0, 0.0, P * np.log(np.where(P <= 0, 1.0, P)))  # a NaN stays NaN
    return np.exp(-terms.sum(axis=1))


def _effective_rank_k(V: np.ndarray, tr: np.ndarray) -> np.ndarray:
    total = V.sum(axis=1)
    zero = total <= 0  # a NaN stays NaN
    return np.where(zero, 0.0, _exp_entropy(V / np.where(zero, 1.0, total)[:, None]))


def _rankme_k(V: np.ndarray, tr: np.ndarray) -> np.ndarray:
    S = np.sqrt(V)
    total = S.sum(axis=1)
    zero = total <= 0
    return np.where(zero, 0.0, _exp_entropy(S / np.where(zero, 1.0, total)[:, None] + RANKME_EPS))


def _eps_rank_k(V: np.ndarray, tr: np.ndarray, eps: float = 1e-3, relative: bool = True) -> np.ndarray:
    relative = check_bool(relative, "relative", owner="eps_rank")
    # relative: ε·λ_1 with ε >= 1 leaves nothing above it; absolute: any finite threshold
    eps = check_float(eps, "eps", low=0.0, high=1.0 if relative else math.inf, high_inclusive=False, owner="eps_rank")
    top = _top(V)
    thr = eps * top if relative else np.full(V.shape[0], float(eps))
    out = np.where(top > 0, np.count_nonzero(V > thr[:, None], axis=1), 0).astype(np.float64)
    return np.where(np.isnan(V).any(axis=1), np.nan, out)


def _energy_rank_k(V: np.ndarray, tr: np.ndarray, q: float = 0.9) -> np.ndarray:
    q = check_float(q, "q", low=0.0, high=1.0, low_inclusive=False, owner="energy_rank")
    if V.shape[1] == 0:
        return np.zeros(V.shape[0])
    below = np.cumsum(V, axis=1) < (q * tr * (1.0 - 1e-12))[:, None]  # the cumulative sum is non-decreasing
    k = np.minimum(np.count_nonzero(below, axis=1) + 1, V.shape[1])
    return np.where(np.isnan(V).any(axis=1) | np.isnan(tr), np.nan, np.where(tr > 0, k, 0).astype(np.float64))


def _nuclear_ratio_k(V: np.ndarray, tr: np.ndarray) -> np.ndarray:
    S = np.sqrt(V)
    return _ratio(S.sum(axis=1), _top(S))


def _one(kernel: Callable[..., np.ndarray], s: Spectrum, **params: Any) -> float:
    v = _values(s)
    value = float(kernel(v[None, :], np.array([s.trace]), **params)[0])
    if s.truncated and not _determined_by_top(kernel, v, s.trace, value, params):
        return float("nan")
    return value


def _determined_by_top(kernel: Callable[..., np.ndarray], v: np.ndarray, trace: float, value: float, params: dict[str, Any]) -> bool:
    """Whether a metric's value on the top K eigenvalues (and the full trace) of a spectrum stored
    truncated is its value on the whole spectrum: always for the stable rank (Σλ / λ_1); for the
    ε-rank when a stored eigenvalue is already at or below the threshold; for the energy rank when the
    stored ones reach q·Σλ; never for the others, which need every eigenvalue."""
    if kernel is _stable_rank_k:
        return True
    if kernel is _eps_rank_k:
        return value < len(v)
    if kernel is _energy_rank_k:
        return bool(len(v)) and float(np.cumsum(v)[-1]) >= params.get("q", 0.9) * trace * (1.0 - 1e-12)
    return False


def stable_rank(s: Spectrum) -> float:
    """Σλ / λ_1 (= ‖X‖_F² / ‖X‖_2²)."""
    return _one(_stable_rank_k, s)


def participation_ratio(s: Spectrum) -> float:
    """(Σλ)² / Σλ² over the eigenvalues."""
    return _one(_participation_ratio_k, s)


def effective_rank(s: Spectrum) -> float:
    """exp of the Shannon entropy of p = λ / Σλ (Roy & Vetterli 2007, on the covariance spectrum)."""
    return _one(_effective_rank_k, s)


def rankme(s: Spectrum) -> float:
    """RankMe (Garrido et al. 2023): exp entropy of p_i = σ_i / Σσ + 1e-7, σ_i = √λ_i."""
    return _one(_rankme_k, s)


def eps_rank(s: Spectrum, eps: float = 1e-3, relative: bool = True) -> float:
    """#{λ_i > ε·λ_1} if ``relative`` else #{λ_i > ε}."""
    return _one(_eps_rank_k, s, eps=eps, relative=relative)


def energy_rank(s: Spectrum, q: float = 0.9) -> float:
    """The smallest k with Σ_{i≤k} λ_i ≥ q·Σλ ("cumulative energy 90" for q = 0.9).

    The comparison allows a relative 1e-12 for the round-off of the cumulative sum, so at q = 1 a
    tail holding less than 1e-12 of Σλ is not counted."""
    return _one(_energy_rank_k, s, q=q)


def nuclear_ratio(s: Spectrum) -> float:
    """Σσ / σ_1."""
    return _one(_nuclear_ratio_k, s)


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

# The same formulas, vectorised over K spectra of one length (see the kernels above).
_KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "stable_rank": _stable_rank_k,
    "participation_ratio": _participation_ratio_k,
    "effective_rank": _effective_rank_k,
    "rankme": _rankme_k,
    "eps_rank": _eps_rank_k,
    "energy_rank": _energy_rank_k,
    "nuclear_ratio": _nuclear_ratio_k,
}

#: Metrics that need only tr C, tr C² and λ_1, not the whole spectrum (see :func:`moment_metrics`).
MOMENT_METRICS: tuple[str, ...] = ("stable_rank", "participation_ratio")

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


def _normalize_metric_spec(
    metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None, name: str = "metrics"
) -> dict[str, dict[str, Any]]:
    if metrics is None:
        return {m: {} for m in DEFAULT_METRICS}
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        bad = [k for k, v in metrics.items() if v is not None and not isinstance(v, Mapping)]
        if bad:
            raise TypeError(f"The '{name}' parameter must map each metric to a dict of its parameters (or None). "
                            f"Got {metrics[bad[0]]!r} for {bad[0]!r}.")
        items = [(k, dict(v or {})) for k, v in metrics.items()]
    elif isinstance(metrics, Iterable) and not isinstance(metrics, bytes):
        items = [(m, {}) for m in metrics]
    else:
        raise TypeError(f"The '{name}' parameter must be a metric name, a list of names, or a dict of names to parameters. "
                        f"Got {metrics!r} instead.")
    out: dict[str, dict[str, Any]] = {}
    for metric, params in items:
        if metric not in METRICS:
            import difflib

            close = difflib.get_close_matches(str(metric), METRICS, n=3)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ValueError(
                f"The '{name}' parameter names an unknown metric {metric!r}. Known: {', '.join(METRICS)}.{hint}"
            )
        out[metric] = params
    return out


def _defaults(name: str) -> dict[str, Any]:
    """A metric's parameters (after the spectrum) and their default values, from its signature."""
    import inspect

    return {k: p.default for k, p in list(inspect.signature(METRICS[name]).parameters.items())[1:]}


def check_metric_spec(
    metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None, *, owner: str | None = None, name: str = "metrics"
) -> dict[str, dict[str, Any]]:
    """The normalised metric spec, its parameters checked once, up front: an unknown parameter name
    or a value out of range is a ``ValueError`` naming the metric, the parameter and the value
    received (rather than a failure at every measurement)."""
    # numpy scalars (np.float32(1e-2), np.bool_) become Python numbers: they are stored as JSON
    spec = {metric: {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
            for metric, params in _normalize_metric_spec(metrics, name).items()}
    where = f" of {owner}" if owner else ""
    probe = Spectrum(np.array([2.0, 1.0, 0.0]), 4, 3, True)
    for metric, params in spec.items():
        known = list(_defaults(metric))
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(
                f"The '{name}' parameter{where} gives {metric} an unknown parameter {unknown[0]!r}. "
                f"Its parameters: {', '.join(known) or 'none'}. Got {dict(params)!r}."
            )
        try:
            METRICS[metric](probe, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"The '{name}' parameter{where} gives {metric} a bad value: {e}") from None
    return spec


def metric_params(metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The parameters in force for each parameterised metric of ``metrics``: its defaults updated
    with what was asked (``{"eps_rank": {"eps": 0.001, "relative": True}, "energy_rank": {"q": 0.9}}``
    for the defaults); metrics without parameters are left out."""
    out: dict[str, dict[str, Any]] = {}
    for name, params in _normalize_metric_spec(metrics).items():
        defaults = _defaults(name)
        if defaults:
            out[name] = {**defaults, **params}
    return out


def compute_metrics(s: Spectrum, metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Every requested metric of one spectrum (all of them by default)."""
    spec = _normalize_metric_spec(metrics)
    return {name: METRICS[name](s, **params) for name, params in spec.items()}


def compute_metrics_batch(
    values: np.ndarray, traces: np.ndarray, metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, np.ndarray]:
    """Every requested metric of K spectra of one length at once: ``values`` is (K, m), descending,
    ``traces`` (K,). The same numbers as :func:`compute_metrics` on each row (the same kernels)."""
    spec = _normalize_metric_spec(metrics)
    V = np.asarray(values, dtype=np.float64)
    if V.ndim != 2:
        raise ValueError(f"The 'values' parameter of compute_metrics_batch must be 2-D (K spectra x m). Got shape {V.shape}.")
    tr = np.asarray(traces, dtype=np.float64).reshape(-1)
    out = {}
    for name, params in spec.items():
        out[name] = _KERNELS[name](V, tr, **params)  # the kernels check their parameters
    return out


def moment_metrics(
    trace: np.ndarray,
    top: np.ndarray,
    sum_sq: np.ndarray,
    metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None,
    sum_sq_rel: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The requested metrics among :data:`MOMENT_METRICS` from tr C, λ_1 and tr C² (arrays of K);
    with ``sum_sq_rel`` = Σ(λ/λ_1)² the participation ratio is computed scale-free from it instead."""
    spec = _normalize_metric_spec(metrics)
    trace, top = np.asarray(trace, float), np.asarray(top, float)
    out = {}
    if "stable_rank" in spec:
        out["stable_rank"] = stable_rank_from_moments(trace, top)
    if "participation_ratio" in spec:
        if sum_sq_rel is None:
            out["participation_ratio"] = participation_ratio_from_moments(trace, np.asarray(sum_sq, float))
        else:
            out["participation_ratio"] = participation_ratio_from_moments(_ratio(trace, top), np.asarray(sum_sq_rel, float))
    return out


def measure(X: Any, metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None, center: bool = True) -> dict[str, float]:
    """Spectrum of ``X`` (one eigendecomposition) and every requested metric of it."""
    spec = check_metric_spec(metrics, owner="measure")
    return compute_metrics(spectrum(X, center=center), spec)


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
