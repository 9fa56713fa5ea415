"""Correlations between a metric and the loss (or the gradient norm), with honest intervals.

* ρ: Spearman's rank correlation over the steps both series share.
* [lo, hi]: a 95% moving-block bootstrap interval. Consecutive measurements of a training curve
  are strongly dependent, so pairs are resampled in circular blocks of ``block`` samples (default
  ⌈n^(1/3)⌉) instead of one by one, which would make the interval far too narrow.
* Lead / lag: the Pearson cross-correlation of the first differences of the two series (after
  ranking, so a monotone rescaling changes nothing) at lags −L … L samples. ``best_lag`` (in steps)
  is the lag with the largest |correlation|; a positive lag means the metric's change at step s
  goes with the target's change at step s + lag: the metric **leads**. ``leads`` is ``"metric"``,
  ``"target"`` or ``"neither"`` (lag 0, or a peak under 3/√n — a 2/√n bar would be crossed by chance among ~100 lags — i.e. not distinguishable from
  independent differences).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr

from .._validation import check_int

__all__ = ["spearman_interval", "lead_lag", "correlate", "correlations"]


def _align(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    common = a.dropna().index.intersection(b.dropna().index)
    common = common.sort_values()
    return a.loc[common].to_numpy(float), b.loc[common].to_numpy(float), np.asarray(common, dtype=np.int64)


def spearman_interval(x: Any, y: Any, n_boot: int = 200, block: int | None = None, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(ρ, lo, hi): Spearman ρ and a moving-block bootstrap percentile interval."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    if n < 3:
        return float("nan"), float("nan"), float("nan")
    n_boot = check_int(n_boot, "n_boot", min_value=10, owner="spearman_interval")
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # a constant series (a frozen layer): ρ is undefined
        return float("nan"), float("nan"), float("nan")
    rho = float(spearmanr(x, y).statistic)
    b = max(1, int(np.ceil(n ** (1 / 3)))) if block is None else check_int(block, "block", min_value=1, owner="spearman_interval")
    rng = np.random.default_rng(seed)
    n_blocks = int(np.ceil(n / b))
    starts = rng.integers(0, n, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(b)[None, None, :]).reshape(n_boot, -1)[:, :n] % n
    rx = rankdata(x[idx], axis=1)
    ry = rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (rx * ry).sum(1) / den
    reps = reps[np.isfinite(reps)]
    a = (1 - level) / 2
    lo, hi = (np.quantile(reps, [a, 1 - a]) if len(reps) else (np.nan, np.nan))
    return rho, float(lo), float(hi)


def lead_lag(x: Any, y: Any, steps: Any = None, max_lag: int | None = None) -> tuple[int, float, str]:
    """(best_lag in steps, correlation at it, leads) as defined in the module docstring."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    s = np.arange(n) if steps is None else np.asarray(steps)
    if n < 8:
        return 0, float("nan"), "neither"
    dx = np.diff(rankdata(x))
    dy = np.diff(rankdata(y))
    L = min(n // 4, 50) if max_lag is None else check_int(max_lag, "max_lag", min_value=0, owner="lead_lag")
    best, best_c = 0, 0.0
    for lag in range(-L, L + 1):
        if lag >= 0:
            a, b = dx[: len(dx) - lag], dy[lag:]
        else:
            a, b = dx[-lag:], dy[: len(dy) + lag]
        if len(a) < 4 or a.std() == 0 or b.std() == 0:
            continue
        c = float(np.corrcoef(a, b)[0, 1])
        if abs(c) > abs(best_c) + 1e-12:
            best, best_c = lag, c
    interval = float(np.median(np.diff(s))) if n > 1 else 1.0
    lag_steps = int(round(best * interval))
    if best == 0 or abs(best_c) < 3 / np.sqrt(len(dx)):
        leads = "neither"
    else:
        leads = "metric" if best > 0 else "target"
    return lag_steps, best_c, leads


def correlate(metric: pd.Series, target: pd.Series, *, n_boot: int = 200, seed: int = 0, max_lag: int | None = None) -> dict[str, Any]:
    """ρ, interval and lead/lag of one metric series against one target series (indexed by step)."""
    x, y, s = _align(metric, target)
    rho, lo, hi = spearman_interval(x, y, n_boot=n_boot, seed=seed)
    lag, c, leads = lead_lag(x, y, s, max_lag)
    return {"rho": rho, "lo": lo, "hi": hi, "best_lag": lag, "lag_corr": c, "leads": leads, "n": int(len(x))}


def correlations(
    run: Any,
    metrics: tuple[str, ...] = ("stable_rank", "participation_ratio"),
    targets: tuple[str, ...] = ("loss", "grad_norm"),
    *,
    convention: str | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Every (layer, metric) of a run against each training target that exists.

    Columns: layer, metric, target, rho, lo, hi, best_lag, leads, lag_corr, n, convention.
    """
    from ..store import Run, open_run

    r = run if isinstance(run, Run) else open_run(run)
    conv = convention or r.default_convention
    rows = []
    tseries = {}
    for t in targets:
        try:
            tseries[t] = r.training(t)
        except KeyError:
            continue
    for layer in r.layers:
        for m in metrics:
            try:
                ms = r.metric(m, layer, convention=conv)
            except KeyError:
                continue
            for t, ts in tseries.items():
                res = correlate(ms, ts, n_boot=n_boot, seed=seed)
                rows.append({"layer": layer, "metric": m, "target": t, **res, "convention": conv})
    cols = ["layer", "metric", "target", "rho", "lo", "hi", "best_lag", "leads", "lag_corr", "n", "convention"]
    return pd.DataFrame(rows, columns=cols)
