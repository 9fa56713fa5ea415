"""Phases: a metric curve cut into labelled segments a user can check.

Definition (:func:`segment_phases`):

1. Smooth: a running median over 5 samples (spikes out), then a Savitzky–Golay filter (quadratic,
   edges padded with the end values so a collapse in the first samples is kept)
   over ``smooth`` × n points (odd, at least 5), whose first derivative gives the slope per step.
   With ``time="log"`` the filter runs on a grid uniform in log-steps, so a collapse in the first
   50 steps is not smeared over 500, at the price of coarser boundaries late in training (see
   :func:`smooth_curve`); the default is ``"linear"`` (sample index).
2. Normalised slope r_t = slope_t × (step span of the run) / (range of the smoothed curve): the
   fraction of the curve's range that the current rate would cover over the whole run.
3. Label each sample: ``collapse`` if r_t < −``flat``, ``expansion`` if r_t > ``flat``, else flat.
   A flat stretch is ``stabilization`` once the curve has moved (after a collapse or expansion),
   ``other`` when it comes first (a plateau before anything happens).
4. Repeatedly, the smallest of these is dealt with: a collapse or expansion whose net change is
   under ``min_change`` (10%) of the curve's range becomes flat; a flat stretch shorter than
   ``min_length`` (5%) of the time axis (log-steps by default) joins its longer neighbour; equal
   neighbours are joined.
   Noise wiggles move the slope but not the level, so they go; a sharp collapse in a few samples
   moves the level, so it stays.

Each phase carries start / end steps (inclusive), ``delta`` (the net change of the smoothed curve
across it) and ``share_of_change`` = |delta| / Σ over phases |delta| (net changes, so noise does not
count as change). :func:`early_share` gives the share of that total change made in the first 10%
and 25% of the run's steps.
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


def smooth_curve(values: Any, steps: Any = None, smooth: float = 0.03, time: str = "linear") -> tuple[np.ndarray, np.ndarray]:
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
        y = savgol_filter(xm, win, 2, mode="nearest")
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
    values: Any, steps: Any = None, *, smooth: float = 0.03, flat: float = 0.5, min_length: float = 0.05, min_change: float = 0.1,
    time: str = "linear",
) -> list[Phase]:
    """Cut a metric curve into collapse / expansion / stabilization / other phases."""
    smooth = check_float(smooth, "smooth", low=0.0, high=0.5, low_inclusive=False, owner="segment_phases")
    flat = check_float(flat, "flat", low=0.0, owner="segment_phases")
    min_length = check_float(min_length, "min_length", low=0.0, high=0.5, owner="segment_phases")
    min_change = check_float(min_change, "min_change", low=0.0, high=1.0, owner="segment_phases")
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
    total = rng or 1.0
    axis = np.log(s - s[0] + max(float(np.min(np.diff(s))) if n > 1 else 1.0, (s[-1] - s[0]) / 1000.0)) if time == "log" else np.arange(n, dtype=float)
    axis = (axis - axis[0]) / ((axis[-1] - axis[0]) or 1.0)

    def t_share(run: list[Any]) -> float:
        a, b = run[1], run[2]
        return float(axis[min(b + 1, n - 1)] - axis[a] if b + 1 < n else 1.0 - axis[a])

    def change(run: list[Any]) -> float:
        a, b = run[1], run[2]
        return abs(float(y[b] - y[max(a - 1, 0)])) / total

    # pass 1: a collapse or expansion that moves less than min_change of the range is no move
    for r_ in runs:
        if r_[0] != "flat" and change(r_) < min_change:
            r_[0] = "flat"
    runs = _runs_join(runs)
    # pass 2: flat stretches shorter than min_length join their longer neighbour, shortest first
    while len(runs) > 1:
        short = [i for i, r_ in enumerate(runs) if r_[0] == "flat" and t_share(r_) < min_length]
        if not short:
            break
        i = min(short, key=lambda i: t_share(runs[i]))
        if i == 0:
            j = 1
        elif i == len(runs) - 1:
            j = i - 1
        else:
            j = i - 1 if t_share(runs[i - 1]) >= t_share(runs[i + 1]) else i + 1
        lo, hi = min(runs[i][1], runs[j][1]), max(runs[i][2], runs[j][2])
        runs[j] = [runs[j][0], lo, hi]
        del runs[i]
        runs = _runs_join(runs)
    bounds = [(lab, (a - 1 if a > 0 else 0), b) for lab, a, b in runs]
    net_total = sum(abs(float(y[b] - y[lo])) for _, lo, b in bounds) or 1.0
    phases = []
    moved = False
    for (lab, a, b), (_, lo, _) in zip(runs, bounds):
        if lab == "flat":
            lab = "stabilization" if moved else "other"
        else:
            moved = True
        # the change from the sample before the phase to its last sample belongs to it
        delta = float(y[b] - y[lo])
        phases.append(Phase(lab, int(s[a]), int(s[b]), abs(delta) / net_total, delta))
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
    values: Any, steps: Any = None, fractions: tuple[float, ...] = (0.1, 0.25), smooth: float = 0.03, time: str = "linear", **phase_kwargs: Any
) -> dict[float, float]:
    """Share of the total change made within the first ``fraction`` of the run's steps.

    The total change is Σ|Δ| over the phases of :func:`segment_phases` (net change of the smoothed
    curve per phase); the part within the cut counts each phase's net change up to the cut, at most
    that phase's whole net change (a phase that overshoots before the cut and comes back does not
    count more than it moved), so the share lies in [0, 1].
    """
    x, s = as_series(values, steps, owner="early_share")
    y, _ = smooth_curve(x, s, smooth, time)
    ph = segment_phases(x, s, smooth=smooth, time=time, **phase_kwargs)
    pos = {int(v): i for i, v in enumerate(s)}
    spans = []
    for p in ph:
        a, b = pos[p.start], pos[p.end]
        spans.append((a - 1 if a > 0 else 0, b))
    total = sum(abs(float(y[b] - y[lo])) for lo, b in spans) or 1.0
    out = {}
    for f in fractions:
        f = check_float(f, "fractions", low=0.0, high=1.0, owner="early_share")
        cut = s[0] + f * (s[-1] - s[0])
        k = int(np.searchsorted(s, cut, side="right") - 1)
        part = sum(min(abs(float(y[min(b, k)] - y[lo])), abs(float(y[b] - y[lo]))) for lo, b in spans if lo <= k)
        out[f] = part / total
    return out


def phases_frame(phases: list[Phase]) -> pd.DataFrame:
    return pd.DataFrame([p.to_payload() for p in phases], columns=["label", "start", "end", "share_of_change", "delta"])
