"""Sampling resolution: which transitions would a coarser measurement schedule still see?

The seed compared high- and low-frequency tracking. :func:`resolution_analysis` makes that
comparison on one stored series: the detector runs on the full series (the reference), then on
the same series subsampled to the measurements whose step is a multiple of each ``every`` (25, 100,
500, 1000 by default). The detector's windows are counted in samples, so at a coarser resolution
they are rescaled to keep the same span in *steps* (``window`` and ``min_size`` × base interval /
every, at least 3 and 2 samples). A reference transition is **seen** at a resolution when a
detection there lies within ``max(tolerance, every)`` steps of it — a coarse schedule cannot date
a change more finely than its own spacing — matched one to one (one coarse detection cannot
account for several reference transitions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_int
from .detectors import BaseDetector, Pelt, as_series

__all__ = ["resolution_analysis", "ResolutionResult"]


class ResolutionResult:
    """``table``: one row per reference transition (step, size, significant, then one bool column
    ``seen_<every>`` per resolution); ``summary``: per resolution the samples, detections, the
    reference transitions seen / missed and the detections with no reference counterpart."""

    def __init__(self, table: pd.DataFrame, summary: pd.DataFrame) -> None:
        self.table = table
        self.summary = summary

    def missed(self, every: int) -> list[int]:
        """Reference transition steps that resolution ``every`` misses."""
        return [int(s) for s in self.table.loc[~self.table[f"seen_{every}"], "step"]]

    def seen(self, every: int) -> list[int]:
        return [int(s) for s in self.table.loc[self.table[f"seen_{every}"], "step"]]


def _rescaled(detector: BaseDetector, factor: float) -> BaseDetector:
    params = detector.get_params()
    new: dict[str, Any] = {}
    if "window" in params and params["window"] is not None:
        new["window"] = max(3, int(round(params["window"] * factor)))
    if "min_size" in params and params["min_size"] is not None:
        new["min_size"] = max(2, int(round(params["min_size"] * factor)))
    if "refractory" in params and params["refractory"] is not None:
        new["refractory"] = max(0, int(round(params["refractory"] * factor)))
    return detector.clone(**new)


def _match_one_to_one(found: Sequence[int], ref: Sequence[int], tol: int) -> tuple[list[bool], list[int]]:
    """Each coarse detection accounts for at most one reference transition (the nearest unmatched
    one within ``tol``); returns (seen flag per reference transition, unmatched detections)."""
    seen = [False] * len(ref)
    extra = []
    for f in sorted(found):
        cands = [i for i, t in enumerate(ref) if not seen[i] and abs(f - t) <= tol]
        if cands:
            seen[min(cands, key=lambda i: abs(f - ref[i]))] = True
        else:
            extra.append(f)
    return seen, extra


def resolution_analysis(
    values: Any,
    steps: Any = None,
    detector: BaseDetector | None = None,
    resolutions: Sequence[int] = (25, 100, 500, 1000),
    *,
    tolerance: int = 5,
    noise_floor: float | None = None,
    k: float = 3.0,
    significant_only: bool = True,
) -> ResolutionResult:
    """Compare the transitions found at full resolution with those found at coarser ones.

    With ``noise_floor``, transitions smaller than ``k`` × noise floor are marked not significant:
    reference ones are (``significant_only``) left out of the comparison, coarse ones are dropped.
    """
    det = detector if detector is not None else Pelt()
    tolerance = check_int(tolerance, "tolerance", min_value=0, owner="resolution_analysis")
    x, s = as_series(values, steps, owner="resolution_analysis")
    base = float(np.median(np.diff(s))) if len(s) > 1 else 1.0
    ref = det.clone().fit(x, s)
    ref_steps = ref.predict()
    sizes = ref.sizes()
    sig = [noise_floor is None or (np.isfinite(z) and abs(z) >= k * noise_floor) for z in sizes]
    keep = [i for i in range(len(ref_steps)) if sig[i] or not significant_only]
    table = pd.DataFrame({"step": [ref_steps[i] for i in keep], "size": [sizes[i] for i in keep], "significant": [sig[i] for i in keep]})
    summary = []
    for every in resolutions:
        every = check_int(every, "resolutions", min_value=1, owner="resolution_analysis")
        mask = s % every == 0
        xs, ss = x[mask], s[mask]
        tol = max(tolerance, every)
        found = []
        if len(xs) >= 6:
            d = _rescaled(det, base / every).fit(xs, ss)
            found = [st for st, z in zip(d.predict(), d.sizes()) if noise_floor is None or (np.isfinite(z) and abs(z) >= k * noise_floor)]
        seen, extra = _match_one_to_one(found, list(table["step"]), tol)
        table[f"seen_{every}"] = seen
        summary.append(
            {"every": every, "samples": int(len(xs)), "detections": len(found), "seen": int(sum(seen)), "missed": int(len(seen) - sum(seen)), "extra": len(extra)}
        )
    summary.insert(0, {"every": int(base), "samples": int(len(x)), "detections": len(ref_steps), "seen": int(len(table)), "missed": 0, "extra": 0})
    return ResolutionResult(table, pd.DataFrame(summary))
