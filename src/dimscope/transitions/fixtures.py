"""Ground-truth fixtures for the validity harness: planted changes and null controls.

A :class:`Fixture` holds one or more replicate series (rows of ``values``), the training steps of
the samples, the true change steps (empty for a null control) and a matching tolerance in steps.

The standard battery (:func:`standard_battery`) has two parts.

*ndtracker's* (REFERENCE.md §2): ``planted_step`` (10 → 20 at step 200 of 400, σ = 0.3),
``three_steps`` (three steps in 600), nulls ``white_noise`` (N(0, 1), 1000 steps) and
``linear_drift`` (10 → 20 over 1000 steps, σ = 0.3). Those steps are ~33σ: easy.

*Harder ones*, closer to real metric curves: ``small_step_1sigma`` / ``2sigma`` / ``3sigma`` (one
step of 1, 2, 3 noise σ), ``step_on_drift`` (a 5σ step on a linear drift), ``heteroscedastic``
(two 4-unit steps while σ grows from 0.2 to 1.5), nulls ``ar1`` (AR(1), φ = 0.9) and ``saturating``
(a smooth curve that collapses fast and recovers slowly, like a dimensionality metric, σ = 0.15).

Each fixture has ``replicates`` independent noise draws from a fixed seed, so recall is a rate
and a null's false-positive rate is counted over replicates × length steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validation import check_choice, check_int

__all__ = ["Fixture", "standard_battery", "ndtracker_battery", "fixture_from_run"]


@dataclass
class Fixture:
    """One ground-truth case.

    ``values``: shape (n,) or (replicates, n). ``steps``: the training step of each sample
    (default 0..n−1). ``truth``: the steps where a change starts (empty: a null control).
    ``tolerance``: a detection within this many steps of a true change matches it.
    """

    name: str
    values: np.ndarray
    truth: tuple[int, ...] = ()
    steps: np.ndarray | None = None
    tolerance: int = 5
    description: str = ""
    kind: str = field(default="")

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] < 2:
            raise ValueError(f"The 'values' parameter of Fixture {self.name!r} must be 1-D or 2-D (replicates, n). Got shape {np.shape(self.values)}.")
        self.values = v
        if self.steps is None:
            self.steps = np.arange(v.shape[1], dtype=np.int64)
        else:
            self.steps = np.asarray(self.steps, dtype=np.int64)
            if self.steps.shape != (v.shape[1],):
                raise ValueError(f"The 'steps' parameter of Fixture {self.name!r} must have length {v.shape[1]}. Got {self.steps.shape}.")
        self.truth = tuple(int(t) for t in self.truth)
        self.tolerance = check_int(self.tolerance, "tolerance", min_value=0, owner="Fixture")
        expected = "null" if not self.truth else "positive"
        if self.kind:
            check_choice(self.kind, "kind", ("positive", "null"), owner="Fixture")
            if self.kind != expected:
                raise ValueError(f"Fixture {self.name!r} has kind {self.kind!r} but {len(self.truth)} true changes.")
        self.kind = expected

    @property
    def is_null(self) -> bool:
        return not self.truth

    @property
    def n_steps(self) -> int:
        """Training steps covered by one replicate (last − first + 1)."""
        return int(self.steps[-1] - self.steps[0] + 1)


def _reps(fn: Callable[[np.random.Generator], np.ndarray], replicates: int, seed: int) -> np.ndarray:
    return np.stack([fn(np.random.default_rng([seed, r])) for r in range(replicates)])


def ndtracker_battery(replicates: int = 10, seed: int = 0, tolerance: int = 5) -> list[Fixture]:
    """ndtracker 2.0's four fixtures (REFERENCE.md §2), with ``replicates`` noise draws each."""
    t400, t600 = np.arange(400), np.arange(600)

    def planted(g: np.random.Generator) -> np.ndarray:
        return np.where(t400 < 200, 10.0, 20.0) + g.normal(0, 0.3, 400)

    def three(g: np.random.Generator) -> np.ndarray:
        level = np.select([t600 < 150, t600 < 300, t600 < 450], [10.0, 20.0, 15.0], 25.0)
        return level + g.normal(0, 0.3, 600)

    return [
        Fixture("planted_step", _reps(planted, replicates, seed + 1), (200,), tolerance=tolerance, description="10 -> 20 at step 200, sigma 0.3 (ndtracker)"),
        Fixture("three_steps", _reps(three, replicates, seed + 2), (150, 300, 450), tolerance=tolerance, description="10/20/15/25, steps at 150, 300, 450, sigma 0.3 (ndtracker)"),
        Fixture("white_noise", _reps(lambda g: g.normal(0, 1, 1000), replicates, seed + 3), tolerance=tolerance, description="N(0, 1), 1000 steps (ndtracker null)"),
        Fixture("linear_drift", _reps(lambda g: np.linspace(10, 20, 1000) + g.normal(0, 0.3, 1000), replicates, seed + 4), tolerance=tolerance, description="10 -> 20 linear drift, sigma 0.3 (ndtracker null)"),
    ]


def standard_battery(replicates: int = 10, seed: int = 0, tolerance: int = 5) -> list[Fixture]:
    """ndtracker's fixtures plus the harder positives and nulls listed in the module docstring."""
    fx = ndtracker_battery(replicates, seed, tolerance)
    t600, t800, t1000 = np.arange(600), np.arange(800), np.arange(1000)

    def small(k: float) -> Callable[[np.random.Generator], np.ndarray]:
        return lambda g: np.where(t600 < 300, 0.0, k) + g.normal(0, 1.0, 600)

    def on_drift(g: np.random.Generator) -> np.ndarray:
        return 0.01 * t800 + np.where(t800 < 400, 0.0, 1.5) + g.normal(0, 0.3, 800)

    def hetero(g: np.random.Generator) -> np.ndarray:
        sigma = np.linspace(0.2, 1.5, 800)
        return np.select([t800 < 250, t800 < 550], [0.0, 4.0], 0.0) + g.normal(0, 1.0, 800) * sigma

    def ar1(g: np.random.Generator) -> np.ndarray:
        e = g.normal(0, 1.0, 1000 + 200)
        x = np.zeros_like(e)
        for i in range(1, len(e)):
            x[i] = 0.9 * x[i - 1] + e[i]
        return x[200:]

    def saturating(g: np.random.Generator) -> np.ndarray:
        # a dimensionality-like curve: fast collapse from 6 to ~3, then a slow saturating recovery
        t = t1000.astype(float)
        return 3.0 + 3.0 * np.exp(-t / 30.0) + 1.5 * (1 - np.exp(-t / 300.0)) + g.normal(0, 0.15, 1000)

    fx += [
        Fixture(f"small_step_{k}sigma", _reps(small(float(k)), replicates, seed + 10 + k), (300,), tolerance=tolerance, description=f"one {k} sigma step at 300 of 600, sigma 1")
        for k in (1, 2, 3)
    ]
    fx += [
        Fixture("step_on_drift", _reps(on_drift, replicates, seed + 20), (400,), tolerance=tolerance, description="+1.5 (5 sigma) at 400 on a 0.01/step drift, sigma 0.3"),
        Fixture("heteroscedastic", _reps(hetero, replicates, seed + 21), (250, 550), tolerance=tolerance, description="+4 at 250, -4 at 550, sigma 0.2 -> 1.5"),
        Fixture("ar1", _reps(ar1, replicates, seed + 22), tolerance=tolerance, description="AR(1) phi = 0.9, unit innovations (null)"),
        Fixture("saturating", _reps(saturating, replicates, seed + 23), tolerance=tolerance, description="3 + 3exp(-t/30) + 1.5(1-exp(-t/300)), sigma 0.15 (null)"),
    ]
    return fx


def fixture_from_run(
    run: Any,
    metric: str,
    layer: str,
    *,
    truth: Sequence[int] = (),
    start: int | None = None,
    end: int | None = None,
    convention: str | None = None,
    tolerance: int | None = None,
    name: str | None = None,
) -> Fixture:
    """A fixture from a stored metric curve (``run``: a path or a :class:`~dimscope.Run`).

    Give ``truth`` (the steps of changes you have verified) for a positive fixture, or pick a
    stretch with nothing in it (``start``/``end``, in steps) for a null control. The default
    tolerance is one sampling interval (at least 5 steps).
    """
    from ..store import Run, open_run

    r = run if isinstance(run, Run) else open_run(run)
    s = r.metric(metric, layer, convention=convention).dropna()
    if start is not None:
        s = s[s.index >= start]
    if end is not None:
        s = s[s.index <= end]
    if len(s) < 2:
        raise ValueError(f"The stretch [{start}, {end}] of {layer}/{metric} holds {len(s)} samples; need at least 2.")
    steps = s.index.to_numpy().astype(np.int64)
    tol = tolerance if tolerance is not None else max(5, int(np.median(np.diff(steps))))
    return Fixture(name or f"run:{layer}/{metric}", s.to_numpy(), tuple(truth), steps=steps, tolerance=tol, description=f"from run {r.path}")
