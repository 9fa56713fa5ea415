"""The precursor gap: does the geometry of a representation change before the behaviour does?

Operational definitions (REFERENCE.md §4; the parameters are stored with every result):

**t_beh** (behaviour) — on the held-out accuracy curve a(t): with ``final`` the median of the last
``k`` evaluations and ``chance`` the chance level, t_beh is the first checkpoint where
a(t) ≥ chance + ``fraction`` · (final − chance) (``fraction`` = 0.5: "half of its final gain over
chance") and a stays at or above that level for ``k`` consecutive evaluations (this one included).
Undefined (None) when the final gain is below ``min_gain`` · (1 − chance).

**t_probe** — the same rule on a linear probe's held-out accuracy (chance = the probe's chance level).

**t_geo** (geometry) — on the RankMe curve r(t): the *floor* is the minimum of r smoothed by a
centered running median of ``smooth_width`` (5) checkpoints, at checkpoint t_min (so one noisy low
value is not taken for the floor). For each later checkpoint i, σ_i is a robust noise scale from
the trailing window of ``window`` first differences of r ending at i−1: σ_i = 1.4826 · MAD(Δr) / √2
(the MAD of differences is insensitive to a linear trend; /√2 turns the noise of a difference into
the noise of a value), floored at ``rel_floor`` · floor. t_geo is the first i > t_min where the raw
r(i) − floor > m · σ_i and the rise persists: r(j) − floor > m · σ_i for the ``k`` checkpoints
j = i … i+k−1 and r(i+k−1) ≥ r(i) ("keeps rising"). Undefined when no such checkpoint exists.
The *collapse minimum* reported beside it is the raw minimum of r and its step.

**Gap** — gap = t_beh − t_geo (and t_beh − t_probe), in optimizer steps and in checkpoint units
(the difference of their indices in the series). The *checkpoint spacing* is the step distance from
the checkpoint before t_beh to t_beh (local, so log-spaced series such as Pythia's are handled).
Per seed the verdict is ``"precursor"`` when gap > spacing, else ``"none"``. Over seeds the gap's
interval is the Student-t ``confidence`` interval of the mean (the single value when one seed); the
verdict is ``"precursor"`` when the interval's lower end exceeds the largest spacing, ``"none"`` when
the mean does not exceed it, and ``"inconclusive"`` otherwise.

**Collapse order** — for each layer the step at which its RankMe first comes within
``reach_level`` (10 %) of its total fall from the first checkpoint to its minimum. Layers are
given shallow → deep; the order is ``"top-down"`` when these steps never increase with depth and
differ somewhere, ``"bottom-up"`` when they never decrease and differ somewhere, ``"simultaneous"``
when all are equal, ``"mixed"`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_float, check_int

__all__ = [
    "PrecursorParams",
    "PrecursorResult",
    "t_behaviour",
    "t_geometry",
    "collapse_minimum",
    "smooth",
    "collapse_reach",
    "collapse_order",
    "seed_interval",
    "precursor_gap",
]


@dataclass(frozen=True)
class PrecursorParams:
    """The parameters of the operational definitions (see the module docstring)."""

    k: int = 3
    fraction: float = 0.5
    min_gain: float = 0.05
    m: float = 3.0
    window: int = 20
    rel_floor: float = 0.01
    reach_level: float = 0.1
    smooth_width: int = 5
    confidence: float = 0.95

    def validate(self) -> PrecursorParams:
        o = "precursor_gap"
        check_int(self.k, "k", min_value=1, owner=o)
        check_float(self.fraction, "fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, owner=o)
        check_float(self.min_gain, "min_gain", low=0.0, high=1.0, owner=o)
        check_float(self.m, "m", low=0.0, owner=o)
        check_int(self.window, "window", min_value=2, owner=o)
        check_float(self.rel_floor, "rel_floor", low=0.0, owner=o)
        check_float(self.reach_level, "reach_level", low=0.0, high=1.0, owner=o)
        check_int(self.smooth_width, "smooth_width", min_value=1, owner=o)
        check_float(self.confidence, "confidence", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, owner=o)
        return self

    def criterion(self) -> str:
        """The definitions in one paragraph, with the parameter values."""
        return (
            f"t_beh / t_probe: first checkpoint where held-out (probe) accuracy >= chance + {self.fraction:g} x "
            f"(final - chance) and stays there for {self.k} consecutive evaluations (final = median of the last {self.k}). "
            f"t_geo: the first checkpoint after the RankMe floor (minimum of a centered running median of "
            f"{self.smooth_width} checkpoints) where RankMe exceeds the floor by more than "
            f"{self.m:g} robust sigma (1.4826 MAD of first differences / sqrt 2 over a trailing window of {self.window}, "
            f"floored at {self.rel_floor:g} x the minimum) for {self.k} consecutive checkpoints and is still rising. "
            f"gap = t_beh - t_geo; a precursor only when the gap exceeds the checkpoint spacing at t_beh "
            f"(over seeds: when the lower end of the {self.confidence:.0%} t-interval does)."
        )


def _clean(series: Any, name: str) -> pd.Series:
    if isinstance(series, pd.Series):
        s = series
    elif isinstance(series, Mapping):
        s = pd.Series(dict(series))
    else:
        raise TypeError(f"The '{name}' parameter must be a pandas Series indexed by step (or a dict step -> value). Got {type(series).__name__}.")
    s = pd.to_numeric(s, errors="coerce").dropna()
    s.index = s.index.astype(np.int64)
    return s[~s.index.duplicated(keep="last")].sort_index().astype(np.float64)


def _first_sustained(ok: np.ndarray, k: int) -> int | None:
    n = len(ok)
    for i in range(n - k + 1):
        if ok[i : i + k].all():
            return i
    return None


def t_behaviour(values: pd.Series, chance: float = 0.0, *, k: int = 3, fraction: float = 0.5, min_gain: float = 0.05) -> int | None:
    """The step of the first checkpoint with half (``fraction``) of the final gain over ``chance``,
    held for ``k`` consecutive evaluations; None when there is no such checkpoint or no real gain."""
    s = _clean(values, "values")
    if len(s) < k:
        return None
    v = s.to_numpy()
    final = float(np.median(v[-k:]))
    gain = final - chance
    if gain <= min_gain * max(1.0 - chance, 1e-12):
        return None
    level = chance + fraction * gain
    i = _first_sustained(v >= level, k)
    return None if i is None else int(s.index[i])


def collapse_minimum(rankme: pd.Series) -> tuple[int, float]:
    """(step, value) of the RankMe minimum (the first one if tied)."""
    s = _clean(rankme, "rankme")
    if s.empty:
        raise ValueError("The 'rankme' parameter is empty.")
    i = int(np.argmin(s.to_numpy()))
    return int(s.index[i]), float(s.iloc[i])


def _robust_sigma(diffs: np.ndarray) -> float:
    if len(diffs) == 0:
        return 0.0
    med = np.median(diffs)
    return float(1.4826 * np.median(np.abs(diffs - med)) / math.sqrt(2.0))


def smooth(series: pd.Series, width: int = 5) -> pd.Series:
    """Centered rolling median over ``width`` checkpoints (shorter at the ends). A median does not
    move a monotone rise or a step, so the timings it gives are not shifted."""
    s = _clean(series, "series")
    if width <= 1:
        return s
    return s.rolling(width, center=True, min_periods=1).median()


def t_geometry(
    rankme: pd.Series, *, m: float = 3.0, window: int = 20, k: int = 3, rel_floor: float = 0.01, smooth_width: int = 5
) -> int | None:
    """The step of the first sustained rise of RankMe above its minimum (see the module docstring)."""
    raw = _clean(rankme, "rankme")
    s = smooth(raw, smooth_width)
    n = len(raw)
    if n < 2:
        return None
    i_min = int(np.argmin(s.to_numpy()))  # the minimum of the smoothed curve: the floor, not one noisy value
    r_min = float(s.iloc[i_min])
    r = raw.to_numpy()  # crossings are tested on the raw values: no shift from the smoothing
    floor = rel_floor * abs(r_min)
    d = np.diff(r)
    for i in range(i_min + 1, n - k + 1):
        lo = max(0, i - 1 - window)
        sigma = max(_robust_sigma(d[lo : i - 1]), floor)
        thr = m * sigma
        seg = r[i : i + k] - r_min
        if (seg > thr).all() and r[i + k - 1] >= r[i]:
            return int(s.index[i])
    return None


def collapse_reach(rankme: pd.Series, level: float = 0.1) -> int | None:
    """The first step where RankMe is within ``level`` of its fall (first value → minimum) from the
    minimum; None when it never falls."""
    s = _clean(rankme, "rankme")
    if s.empty:
        return None
    r = s.to_numpy()
    i_min = int(np.argmin(r))
    drop = float(r[0] - r[i_min])
    if drop <= 0:
        return None
    hit = np.nonzero(r[: i_min + 1] <= r[i_min] + level * drop)[0]
    return int(s.index[hit[0]])


def collapse_order(reach: Mapping[str, int | None] | Sequence[tuple[str, int | None]]) -> str:
    """Classify per-layer collapse times given shallow → deep (see the module docstring)."""
    items = list(reach.items()) if isinstance(reach, Mapping) else list(reach)
    t = [v for _, v in items if v is not None]
    if len(t) < 2:
        return "single layer" if len(items) < 2 else "undetermined"
    dif = np.diff(np.asarray(t, dtype=float))
    if (dif == 0).all():
        return "simultaneous"
    if (dif <= 0).all():
        return "top-down"
    if (dif >= 0).all():
        return "bottom-up"
    return "mixed"


def seed_interval(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, float | int]:
    """Mean and Student-t interval of the mean over seeds (None / NaN values are left out)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "min": float("nan"), "max": float("nan")}
    mean = float(v.mean())
    if n == 1:
        lo = hi = mean
    else:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
        lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "min": float(v.min()), "max": float(v.max())}


@dataclass
class PrecursorResult:
    """What :func:`precursor_gap` found.

    ``per_seed``: one row per seed — headline layer, collapse minimum (value and step), t_geo,
    t_probe, t_beh, the gaps in steps and checkpoints, the spacing and the per-seed verdicts.
    ``per_layer``: one row per seed and layer — RankMe minimum, its step, collapse reach, t_geo,
    t_probe, final probe accuracy. ``summary``: intervals over seeds and verdicts.
    """

    per_seed: pd.DataFrame
    per_layer: pd.DataFrame
    summary: dict[str, Any]
    params: PrecursorParams = field(default_factory=PrecursorParams)

    @property
    def verdict(self) -> str:
        return str(self.summary["geo"]["verdict"])

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "criterion": self.params.criterion(), "params": self.params.__dict__}


def _index_of(steps: np.ndarray, step: int | None) -> int | None:
    if step is None:
        return None
    hit = np.nonzero(steps == step)[0]
    return int(hit[0]) if len(hit) else int(np.searchsorted(steps, step))


def _verdict(stats: dict[str, float | int], spacing: float) -> str:
    if stats["n"] == 0 or not np.isfinite(spacing):
        return "undetermined"
    if stats["lo"] > spacing:
        return "precursor"
    if stats["mean"] <= spacing:
        return "none"
    return "inconclusive"


def _normalise_layers(x: Any, name: str) -> dict[str, pd.Series]:
    if x is None:
        return {}
    if isinstance(x, (pd.Series,)):
        return {"": x}
    if isinstance(x, Mapping):
        return {str(k): v for k, v in x.items()}
    raise TypeError(f"The '{name}' parameter must be a Series or a dict layer -> Series. Got {type(x).__name__}.")


def precursor_gap(
    behaviour: pd.Series | Mapping[Any, pd.Series],
    geometry: pd.Series | Mapping[str, pd.Series] | Mapping[Any, Mapping[str, pd.Series]],
    probe: pd.Series | Mapping[str, pd.Series] | Mapping[Any, Mapping[str, pd.Series]] | None = None,
    *,
    chance: float = 0.0,
    probe_chance: float | None = None,
    layer: str | None = None,
    params: PrecursorParams | None = None,
    **overrides: Any,
) -> PrecursorResult:
    """t_geo, t_probe, t_beh and the precursor gap, per seed and over seeds.

    Parameters
    ----------
    behaviour:
        Held-out accuracy indexed by step — one Series (one seed), or a dict seed → Series.
    geometry:
        RankMe indexed by step: one seed → a Series or a dict layer → Series (layers given shallow →
        deep); several seeds → a dict seed → (dict layer → Series), with the seeds of ``behaviour``.
    probe:
        Linear-probe held-out accuracy, shaped like ``geometry`` (optional).
    chance, probe_chance:
        Chance levels of the behaviour and the probe (``probe_chance`` defaults to ``chance``).
    layer:
        The headline layer for t_geo and t_probe (default: the deepest layer given).
    params, **overrides:
        :class:`PrecursorParams` (k, fraction, min_gain, m, window, rel_floor, reach_level,
        confidence), or any of them as keywords.
    """
    p = (params or PrecursorParams())
    if overrides:
        unknown = set(overrides) - set(PrecursorParams.__dataclass_fields__)
        if unknown:
            raise TypeError(f"precursor_gap got unknown parameter(s) {sorted(unknown)}; known: {sorted(PrecursorParams.__dataclass_fields__)}.")
        p = PrecursorParams(**{**p.__dict__, **overrides})
    p.validate()
    chance = check_float(chance, "chance", low=0.0, high=1.0, owner="precursor_gap")
    probe_chance = chance if probe_chance is None else check_float(probe_chance, "probe_chance", low=0.0, high=1.0, owner="precursor_gap")

    if isinstance(behaviour, pd.Series):
        seeds_beh: dict[Any, pd.Series] = {0: behaviour}
        seeds_geo = {0: _normalise_layers(geometry, "geometry")}
        seeds_probe = {0: _normalise_layers(probe, "probe")}
    elif isinstance(behaviour, Mapping):
        seeds_beh = dict(behaviour)
        if not isinstance(geometry, Mapping) or set(geometry) != set(seeds_beh):
            raise ValueError(
                "With several seeds, 'geometry' must be a dict keyed by the same seeds as 'behaviour' "
                f"({sorted(map(str, seeds_beh))}). Got keys {sorted(map(str, geometry)) if isinstance(geometry, Mapping) else type(geometry).__name__}."
            )
        seeds_geo = {s: _normalise_layers(geometry[s], "geometry") for s in seeds_beh}
        if probe is not None and (not isinstance(probe, Mapping) or set(probe) != set(seeds_beh)):
            raise ValueError("With several seeds, 'probe' must be a dict keyed by the same seeds as 'behaviour'.")
        seeds_probe = {s: _normalise_layers(probe[s], "probe") if probe is not None else {} for s in seeds_beh}
    else:
        raise TypeError(f"The 'behaviour' parameter must be a Series or a dict seed -> Series. Got {type(behaviour).__name__}.")

    seed_rows, layer_rows = [], []
    for seed, beh in seeds_beh.items():
        beh = _clean(beh, "behaviour")
        geo = seeds_geo[seed]
        prb = seeds_probe[seed]
        if not geo:
            raise ValueError(f"No geometry curve for seed {seed!r}.")
        head = layer if layer is not None else list(geo)[-1]
        if head not in geo:
            raise ValueError(f"The 'layer' parameter names {head!r}, which has no geometry curve; layers: {list(geo)}.")
        steps = beh.index.to_numpy()
        t_beh = t_behaviour(beh, chance, k=p.k, fraction=p.fraction, min_gain=p.min_gain)
        reach: dict[str, int | None] = {}
        per_layer_t: dict[str, dict[str, Any]] = {}
        for name, curve in geo.items():
            s_min, v_min = collapse_minimum(curve)
            tg = t_geometry(curve, m=p.m, window=p.window, k=p.k, rel_floor=p.rel_floor, smooth_width=p.smooth_width)
            reach[name] = collapse_reach(curve, p.reach_level)
            tp = None
            final_probe = float("nan")
            if name in prb:
                pc = _clean(prb[name], "probe")
                tp = t_behaviour(pc, probe_chance, k=p.k, fraction=p.fraction, min_gain=p.min_gain)
                final_probe = float(pc.iloc[-1]) if len(pc) else float("nan")
            per_layer_t[name] = {"t_geo": tg, "t_probe": tp}
            layer_rows.append(
                {"seed": seed, "layer": name, "rankme_first": float(_clean(curve, "geometry").iloc[0]), "rankme_min": v_min,
                 "step_min": s_min, "collapse_reach": reach[name], "t_geo": tg, "t_probe": tp, "probe_final": final_probe}
            )
        s_min, v_min = collapse_minimum(geo[head])
        t_geo = per_layer_t[head]["t_geo"]
        t_probe = per_layer_t[head]["t_probe"]
        i_beh = _index_of(steps, t_beh)
        spacing = float(steps[i_beh] - steps[i_beh - 1]) if i_beh is not None and i_beh > 0 else (
            float(np.median(np.diff(steps))) if len(steps) > 1 else float("nan")
        )
        row: dict[str, Any] = {
            "seed": seed, "layer": head, "rankme_min": v_min, "step_min": s_min,
            "t_geo": t_geo, "t_probe": t_probe, "t_beh": t_beh, "spacing": spacing,
            "beh_final": float(np.median(beh.to_numpy()[-p.k:])) if len(beh) else float("nan"),
            "collapse_order": collapse_order(reach),
        }
        for tag, t in (("geo", t_geo), ("probe", t_probe)):
            if t is None or t_beh is None:
                row[f"gap_{tag}"] = None
                row[f"gap_{tag}_ckpt"] = None
                row[f"verdict_{tag}"] = "undetermined"
            else:
                row[f"gap_{tag}"] = int(t_beh - t)
                row[f"gap_{tag}_ckpt"] = int(i_beh - _index_of(steps, t)) if i_beh is not None else None  # type: ignore[operator]
                row[f"verdict_{tag}"] = "precursor" if t_beh - t > spacing else "none"
        seed_rows.append(row)

    per_seed = pd.DataFrame(seed_rows)
    per_layer = pd.DataFrame(layer_rows)
    spacing_all = float(np.nanmax(per_seed["spacing"].to_numpy(dtype=float))) if len(per_seed) else float("nan")
    summary: dict[str, Any] = {"n_seeds": len(per_seed), "spacing": spacing_all, "criterion": p.criterion()}
    for tag in ("geo", "probe"):
        st = seed_interval(list(per_seed[f"gap_{tag}"]), p.confidence)
        st_ck = seed_interval(list(per_seed[f"gap_{tag}_ckpt"]), p.confidence)
        summary[tag] = {**st, "ckpt": st_ck, "verdict": _verdict(st, spacing_all)}
    for col in ("t_geo", "t_probe", "t_beh", "rankme_min", "step_min"):
        summary[col] = seed_interval(list(per_seed[col]), p.confidence)
    orders = list(per_seed["collapse_order"])
    summary["collapse_order"] = max(set(orders), key=orders.count) if orders else "undetermined"
    summary["collapse_order_counts"] = {o: orders.count(o) for o in sorted(set(orders))}
    return PrecursorResult(per_seed, per_layer, summary, p)
