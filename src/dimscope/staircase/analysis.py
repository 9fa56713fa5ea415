"""Staircase analysis: loss drops, ε-rank steps, their coincidence, and the per-layer ordering.

Definitions (ours; every threshold is a parameter and is returned with the result)
--------------------------------------------------------------------------------
*Rises.* A series v (for the loss: −log10(loss); for an ε-rank: the count) is median-filtered over
``smooth`` samples (removes Adam spikes and ±1 flicker); its rate r = max(dv/dsample, 0) is a
Savitzky–Golay derivative (window 2·smooth + 1, quadratic). A **rise** is a peak of r
(``scipy.signal.find_peaks``) at least ``min_ratio`` × the series' average rate
(v_end − v_start)/(n − 1); its region is the contiguous samples around the peak with
r ≥ ``region_frac`` × peak rate, overlapping regions are merged into one, and a region counts only if
it raises v by at least ``min_rise``. A rise is reported as (step of the largest rate, start step,
end step, size).

* A **loss drop** is a rise of −log10(loss) with ``min_rise`` in decades (default 0.1) and
  ``min_ratio`` = 2: a drop falls at least twice as fast as the loss does on average, so a loss that
  decays at a constant log-rate has no drops; and its size is measured on the running minimum of
  the smoothed loss, so only falls to new lows count (a recovery from an Adam spike is not a drop).
  The rest of the time axis is **plateaus**.
* An **ε-rank step** is a rise of the ε-rank count with ``min_rise`` = 1 and no rate condition.
* A drop **coincides** with an ε-rank step of a layer if a step's peak lies within
  [drop start − tol, drop end + tol]. The **share** is coinciding drops / drops. Because wide drops
  and frequent steps coincide by chance too, ``chance_share`` is the mean share over all circular
  shifts of the ε-rank step times along the measured axis (a permutation baseline).
* **Ordering**: the share of measurements at which the ε-rank does not decrease with depth
  (layer ℓ ≤ layer ℓ+1 for every consecutive pair), and the final ε-rank per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter
from scipy.signal import find_peaks, savgol_filter

from .._validation import check_float, check_int

__all__ = ["find_rises", "loss_drops", "eps_rank_steps", "coincidence", "layer_ordering", "StaircaseResult", "analyze_staircase"]

_RISE_COLUMNS = ["step", "start", "end", "size"]


def _series(steps: Any, values: Any, owner: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"The 'steps' and 'values' parameters of {owner} must have the same length. Got {s.size} and {v.size}.")
    keep = np.isfinite(v)
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    return s[order], v[order]


def find_rises(
    steps: Any,
    values: Any,
    *,
    smooth: int = 5,
    min_rise: float = 1.0,
    min_ratio: float = 0.0,
    region_frac: float = 0.25,
    record: bool = False,
) -> pd.DataFrame:
    """Rises of a series (module docstring): DataFrame with columns step, start, end, size.

    With ``record`` the size is the rise of the running maximum of the smoothed series over the
    region (only new highs count: a recovery from a spike is not a rise)."""
    smooth = check_int(smooth, "smooth", min_value=1, owner="find_rises")
    min_rise = check_float(min_rise, "min_rise", low=0.0, owner="find_rises")
    min_ratio = check_float(min_ratio, "min_ratio", low=0.0, owner="find_rises")
    region_frac = check_float(region_frac, "region_frac", low=0.0, high=1.0, owner="find_rises")
    s, v = _series(steps, values, "find_rises")
    n = len(v)
    if n < 3:
        return pd.DataFrame(columns=_RISE_COLUMNS)
    vs = median_filter(v, size=smooth, mode="nearest") if smooth > 1 else v
    win = min(2 * smooth + 1, n if n % 2 else n - 1)
    if smooth > 1 and win >= 3:
        r = savgol_filter(vs, win, polyorder=min(2, win - 1), deriv=1, mode="interp")
    else:
        r = np.diff(vs, prepend=vs[0])
    r = np.clip(r, 0.0, None)
    avg = max((vs[-1] - vs[0]) / (n - 1), 0.0)
    height = max(min_ratio * avg, 1e-12)
    peaks, _ = find_peaks(np.concatenate([[0.0], r, [0.0]]), height=height)
    peaks = peaks - 1
    regions: list[list[int]] = []
    for p in peaks:
        thr = region_frac * r[p]
        a = p
        while a > 0 and r[a - 1] >= thr and r[a - 1] > 0:
            a -= 1
        b = p
        while b < n - 1 and r[b + 1] >= thr and r[b + 1] > 0:
            b += 1
        regions.append([a, b])
    regions.sort()
    merged: list[list[int]] = []
    for a, b in regions:  # overlapping or touching regions are one rise
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    rows: list[tuple[float, float, float, float]] = []
    level = np.maximum.accumulate(vs) if record else vs
    for a, b in merged:
        lo, hi = max(a - 1, 0), min(b + 1, n - 1)
        size = float(level[hi] - level[lo])
        p = a + int(np.argmax(r[a : b + 1]))
        if size >= min_rise and size > 0:
            rows.append((float(s[p]), float(s[a]), float(s[b]), size))
    return pd.DataFrame(rows, columns=_RISE_COLUMNS)


def loss_drops(steps: Any, loss: Any, *, smooth: int = 9, min_drop: float = 0.1, min_ratio: float = 2.0) -> pd.DataFrame:
    """Loss drops: rises of −log10(loss) to new lows (sizes in decades, measured on the running
    minimum of the smoothed loss, so recoveries from spikes do not count). Non-positive losses are an error."""
    s, v = _series(steps, loss, "loss_drops")
    if np.any(v <= 0):
        raise ValueError(f"The 'loss' parameter of loss_drops must be > 0 to take its log. Got min {v.min()!r}.")
    return find_rises(s, -np.log10(v), smooth=smooth, min_rise=min_drop, min_ratio=min_ratio, record=True)


def eps_rank_steps(steps: Any, eps_rank: Any, *, smooth: int = 3, min_step: float = 1.0) -> pd.DataFrame:
    """ε-rank steps: rises of the count by at least ``min_step``."""
    return find_rises(steps, eps_rank, smooth=smooth, min_rise=min_step, min_ratio=0.0)


def _coinciding(drops: pd.DataFrame, rise_steps: np.ndarray, tol: float) -> int:
    if drops.empty or rise_steps.size == 0:
        return 0
    hit = 0
    for a, b in zip(drops["start"].to_numpy(), drops["end"].to_numpy()):
        if np.any((rise_steps >= a - tol) & (rise_steps <= b + tol)):
            hit += 1
    return hit


def coincidence(drops: pd.DataFrame, steps_up: pd.DataFrame, *, tolerance: float, axis: Sequence[float]) -> dict[str, float]:
    """How many loss drops coincide with an ε-rank step (module docstring), and the chance share.

    ``axis`` are the measured steps (the circular shifts of the baseline run over them).
    """
    tol = check_float(tolerance, "tolerance", low=0.0, owner="coincidence")
    n = len(drops)
    rise = steps_up["step"].to_numpy(dtype=np.float64) if len(steps_up) else np.zeros(0)
    hit = _coinciding(drops, rise, tol)
    ax = np.unique(np.asarray(axis, dtype=np.float64))
    chance = float("nan")
    if n and rise.size and ax.size > 1:
        lo, span = ax[0], ax[-1] - ax[0] + (ax[1] - ax[0])
        shares = [_coinciding(drops, lo + np.mod(rise - lo + sh, span), tol) / n for sh in (ax - lo)]
        chance = float(np.mean(shares))
    return {
        "n_drops": n,
        "n_eps_steps": int(rise.size),
        "n_coinciding": hit,
        "share": hit / n if n else float("nan"),
        "chance_share": chance,
        "tolerance": tol,
    }


def layer_ordering(eps_ranks: pd.DataFrame, layers: Sequence[str]) -> dict[str, Any]:
    """Ordering of ε-ranks with depth from a wide frame (index step, one column per layer).

    Returns the share of measurements with ε-rank non-decreasing with depth, and the final values.
    """
    cols = [c for c in layers if c in eps_ranks.columns]
    if len(cols) < 2:
        return {"share_ordered": float("nan"), "final": {c: float(eps_ranks[c].iloc[-1]) for c in cols}}
    a = eps_ranks[cols].dropna().to_numpy()
    ok = np.all(np.diff(a, axis=1) >= 0, axis=1)
    return {"share_ordered": float(ok.mean()) if len(ok) else float("nan"), "final": {c: float(eps_ranks[c].iloc[-1]) for c in cols}}


@dataclass
class StaircaseResult:
    """Everything :func:`analyze_staircase` found for one training run."""

    drops: pd.DataFrame
    steps_up: dict[str, pd.DataFrame]
    table: pd.DataFrame
    ordering: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def plateaus(self) -> pd.DataFrame:
        """The complement of the drop regions on the loss's step axis: columns start, end."""
        lo, hi = self.params["first_step"], self.params["last_step"]
        rows, cur = [], lo
        for a, b in zip(self.drops["start"], self.drops["end"]):
            if a > cur:
                rows.append((cur, a))
            cur = max(cur, b)
        if hi > cur:
            rows.append((cur, hi))
        return pd.DataFrame(rows, columns=["start", "end"])


def analyze_staircase(
    loss: pd.Series,
    eps_ranks: pd.DataFrame | Mapping[str, pd.Series],
    *,
    layers: Sequence[str] | None = None,
    tolerance: float | None = None,
    loss_smooth: int = 9,
    min_drop: float = 0.1,
    min_ratio: float = 2.0,
    eps_smooth: int = 3,
    min_step: float = 1.0,
) -> StaircaseResult:
    """Segment the loss (Series indexed by step) and each layer's ε-rank (columns of a frame indexed
    by step, in depth order), then count coincidences and check the ordering.

    ``tolerance`` (steps) defaults to 3 ε-rank measurement intervals.
    """
    ranks = pd.DataFrame(eps_ranks) if not isinstance(eps_ranks, pd.DataFrame) else eps_ranks
    layers = list(layers) if layers is not None else list(ranks.columns)
    if len(loss) < 3:
        raise ValueError(f"The 'loss' parameter of analyze_staircase needs at least 3 values. Got {len(loss)}.")
    idx = np.asarray(ranks.index, dtype=np.float64)
    every = float(np.median(np.diff(idx))) if len(idx) > 1 else 1.0
    tol = 3 * every if tolerance is None else check_float(tolerance, "tolerance", low=0.0, owner="analyze_staircase")
    drops = loss_drops(loss.index, loss.to_numpy(), smooth=loss_smooth, min_drop=min_drop, min_ratio=min_ratio)
    steps_up, rows = {}, []
    axis = np.asarray(loss.index, dtype=np.float64)
    for layer in layers:
        up = eps_rank_steps(ranks.index, ranks[layer].to_numpy(), smooth=eps_smooth, min_step=min_step)
        steps_up[layer] = up
        rows.append({"layer": layer, **coincidence(drops, up, tolerance=tol, axis=axis[:: max(1, len(axis) // 500)])})
    table = pd.DataFrame(rows)
    return StaircaseResult(
        drops=drops,
        steps_up=steps_up,
        table=table,
        ordering=layer_ordering(ranks, layers),
        params={
            "tolerance": tol,
            "loss_smooth": loss_smooth,
            "min_drop_decades": min_drop,
            "min_ratio": min_ratio,
            "eps_smooth": eps_smooth,
            "min_step": min_step,
            "first_step": float(axis[0]),
            "last_step": float(axis[-1]),
        },
    )
