"""Phases: a metric curve cut into labelled segments a user can check.

Definition (:func:`segment_phases`):

1. Smooth: a running median over 5 samples (spikes out), then a Savitzky–Golay filter (quadratic)
   over ``smooth`` × n points (odd, at least 5), whose first derivative gives the slope per step.
   By default (``time="log"``) the filter runs on a grid uniform in log-steps, so a collapse in
   the first 50 steps is not smeared over 500 (see :func:`smooth_curve`).
2. Normalised slope r_t = slope_t × (step span of the run) / (range of the smoothed curve): the
   fraction of the curve's range that the current rate would cover over the whole run.
3. Label each sample: ``collapse`` if r_t < −``flat``, ``expansion`` if r_t > ``flat``, else flat.
   A flat stretch is ``stabilization`` once the curve has moved (after a collapse or expansion),
   ``other`` when it comes first (a plateau before anything happens).
4. A run whose share of the time axis (log-steps by default) and whose share of the total
   variation are both under ``min_length`` is merged into its heavier neighbour, repeatedly;
   equal neighbours are joined.

Each phase carries start / end steps (inclusive) and ``share_of_change``: its part of the total
variation Σ|Δŷ| of the smoothed curve. :func:`early_share` gives the share of the total variation
in the first 10% and 25% of the run's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_choice, check_float
from .detectors import as_series

__all__ = ["Phase", "segment_phases", "early_share", "smooth_curve"]


@dataclass
class Phase:
    """One labelled segment: ``start`` / ``end`` are training steps (inclusive)."""

    label: str
    start: int
    end: int
    share_of_change: float
    delta: float

    def to_payload(self) -> dict[str, Any]:
        return {"label": self.label, "start": self.start, "end": self.end, "share_of_change": self.share_of_change, "delta": self.delta}


def smooth_curve(values: Any, steps: Any = None, smooth: float = 0.03, time: str = "log") -> tuple[np.ndarray, np.ndarray]:
    """(smoothed values, slope per step) at the samples, as defined in the module docstring.

    ``time="log"`` smooths on a grid uniform in log(step − first + c), c = max(one sampling
    interval, span/1000), so the fast early dynamics of training keep their resolution while the
    slow late part is averaged over more steps; ``time="linear"`` smooths over sample indices.
    """
    from scipy.ndimage import median_filter
    from scipy.signal import savgol_filter

    check_choice(time, "time", ("log", "linear"), owner="segment_phases")
    x, s = as_series(values, steps, owner="segment_phases")
    n = len(x)
    sf = s.astype(np.float64)
    if n < 7:
        return x.copy(), (np.gradient(x, sf) if n > 1 else np.zeros(n))
    xm = median_filter(x, size=5, mode="nearest")
    win = max(5, int(round(smooth * n)) | 1)
    win = min(win, n if n % 2 else n - 1)
    if time == "linear":
        y = savgol_filter(xm, win, 2, mode="interp")
        return y, np.gradient(y, sf)
    off = sf - sf[0]
    c = max(float(np.min(np.diff(sf))), off[-1] / 1000.0)
    u = np.log(off + c)
    grid = np.linspace(u[0], u[-1], n)
    yg = savgol_filter(np.interp(grid, u, xm), win, 2, mode="interp")
    dg = savgol_filter(np.interp(grid, u, xm), win, 2, deriv=1, delta=float(grid[1] - grid[0]), mode="interp")
    y = np.interp(u, grid, yg)
    slope = np.interp(u, grid, dg) / (off + c)
    return y, slope


def _runs(labels: list[str]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for i, lab in enumerate(labels):
        if out and out[-1][0] == lab:
            out[-1][2] = i
        else:
            out.append([lab, i, i])
    return out


def segment_phases(
    values: Any, steps: Any = None, *, smooth: float = 0.03, flat: float = 0.5, min_length: float = 0.05, time: str = "log"
) -> list[Phase]:
    """Cut a metric curve into collapse / expansion / stabilization / other phases."""
    smooth = check_float(smooth, "smooth", low=0.0, high=0.5, low_inclusive=False, owner="segment_phases")
    flat = check_float(flat, "flat", low=0.0, owner="segment_phases")
    min_length = check_float(min_length, "min_length", low=0.0, high=0.5, owner="segment_phases")
    x, s = as_series(values, steps, owner="segment_phases")
    n = len(x)
    if n < 2:
        raise ValueError(f"The 'values' parameter of segment_phases needs at least 2 samples. Got {n}.")
    y, slope = smooth_curve(x, s, smooth, time)
    rng = float(y.max() - y.min())
    span = float(s[-1] - s[0]) or 1.0
    r = slope * span / rng if rng > 0 else np.zeros(n)
    labels = ["collapse" if v < -flat else "expansion" if v > flat else "flat" for v in r]
    runs = _runs(labels)
    tv = np.abs(np.diff(y))
    total = float(tv.sum()) or 1.0
    # a run's weight: the larger of its share of the (log- or linear-) time axis and its share of
    # the total variation; runs under min_length on both are merged into their neighbour
    axis = np.log(s - s[0] + max(float(np.min(np.diff(s))) if n > 1 else 1.0, (s[-1] - s[0]) / 1000.0)) if time == "log" else np.arange(n, dtype=float)
    axis = (axis - axis[0]) / ((axis[-1] - axis[0]) or 1.0)

    def weight(run: list[Any]) -> float:
        a, b = run[1], run[2]
        t_share = axis[min(b + 1, n - 1)] - axis[a] if b + 1 < n else 1.0 - axis[a]
        return max(float(t_share), float(tv[max(a - 1, 0) : b].sum()) / total)

    while len(runs) > 1:
        ws = [weight(r_) for r_ in runs]
        i = int(np.argmin(ws))
        if ws[i] >= min_length:
            break
        if i == 0:
            j = 1
        elif i == len(runs) - 1:
            j = i - 1
        else:
            j = i - 1 if ws[i - 1] >= ws[i + 1] else i + 1
        a, b = min(runs[i][1], runs[j][1]), max(runs[i][2], runs[j][2])
        runs[j] = [runs[j][0], a, b]
        del runs[i]
        runs = _runs_join(runs)
    phases = []
    moved = False
    for k, (lab, a, b) in enumerate(runs):
        if lab == "flat":
            lab = "stabilization" if moved else "other"
        else:
            moved = True
        # the variation between the sample before the phase and its last sample belongs to it
        lo = a - 1 if a > 0 else 0
        share = float(tv[lo:b].sum()) / total
        phases.append(Phase(lab, int(s[a]), int(s[b]), share, float(y[b] - y[lo])))
    return phases


def _runs_join(runs: list[list[Any]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for lab, a, b in runs:
        if out and out[-1][0] == lab:
            out[-1][2] = b
        else:
            out.append([lab, a, b])
    return out


def early_share(
    values: Any, steps: Any = None, fractions: tuple[float, ...] = (0.1, 0.25), smooth: float = 0.03, time: str = "log"
) -> dict[float, float]:
    """Share of the total variation of the smoothed curve within the first ``fraction`` of steps."""
    x, s = as_series(values, steps, owner="early_share")
    y, _ = smooth_curve(x, s, smooth, time)
    tv = np.abs(np.diff(y))
    total = float(tv.sum()) or 1.0
    out = {}
    for f in fractions:
        f = check_float(f, "fractions", low=0.0, high=1.0, owner="early_share")
        cut = s[0] + f * (s[-1] - s[0])
        out[f] = float(tv[s[1:] <= cut].sum()) / total
    return out


def phases_frame(phases: list[Phase]) -> pd.DataFrame:
    return pd.DataFrame([p.to_payload() for p in phases], columns=["label", "start", "end", "share_of_change", "delta"])
