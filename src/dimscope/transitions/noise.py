"""Noise floors: how much a metric moves when only the probe samples change.

A spectrum cannot be bootstrapped (the samples are gone), so the bootstrap happens while
training runs, in a :class:`NoiseFloor` Tracker extension: at a few steps it resamples the rows of
each layer's probe features with replacement ``n_boot`` times, recomputes the spectrum (through
``tracker.features_to_spectrum``, for every recorded centering convention) and every tracked
metric, and stores the replicate values as the artifact ``"transitions/noise_replicates"``
(columns step, layer, metric, convention, replicate, value).

:func:`noise_floor` turns them into the **noise floor** of each (layer, metric, convention): the
median over the bootstrapped steps of the bootstrap standard deviation. A detected change smaller
than ``k`` × noise floor is *not significant*. Where no bootstrap was recorded (an older run, or
a convention the extension could not see such as batch mode), the fallback is the series' own
measurement-to-measurement jitter (:func:`series_jitter`), and the table says ``source="series"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_int
from ..metrics import compute_metrics
from ..tracker import Tracker, TrackerExtension
from .detectors import robust_sigma

__all__ = ["NoiseFloor", "noise_floor", "series_jitter", "REPLICATES_ARTIFACT", "NOISE_ARTIFACT"]

REPLICATES_ARTIFACT = "transitions/noise_replicates"
NOISE_ARTIFACT = "analysis/noise_floor"


class NoiseFloor(TrackerExtension):
    """Bootstrap the probe samples at a few steps (a :class:`~dimscope.TrackerExtension`).

    Parameters
    ----------
    steps:
        Bootstrap at exactly these optimizer steps (they must be measurement steps).
    every:
        Or bootstrap at every step that is a multiple of ``every`` (default 1000 when ``steps`` is
        not given).
    n_boot:
        Bootstrap replicates per step.
    seed:
        Seed of the resampling.

    Runs in probe mode (the Tracker's first mode); the row resampling is seeded per step.
    """

    name = "noise_floor"
    needs_whole_probe = True  # bootstraps the probe rows: one process must hold them all

    def __init__(self, steps: Iterable[int] | None = None, every: int | None = None, n_boot: int = 30, seed: int = 0) -> None:
        self.steps = None if steps is None else sorted({check_int(s, "steps", min_value=0, owner="NoiseFloor") for s in steps})
        self.every = None if every is None else check_int(every, "every", min_value=1, owner="NoiseFloor")
        if self.steps is None and self.every is None:
            self.every = 1000
        self.n_boot = check_int(n_boot, "n_boot", min_value=2, owner="NoiseFloor")
        self.seed = int(seed)
        self.rows: list[tuple[int, str, str, str, int, float]] = []

    def _due(self, step: int) -> bool:
        if self.steps is not None:
            return step in self.steps
        return step % int(self.every) == 0  # type: ignore[arg-type]

    def setup(self, tracker: Tracker) -> None:
        if tracker.modes[0] != "probe":
            raise ValueError("NoiseFloor needs probe mode as the Tracker's first mode (mode='probe' or ('probe', 'batch')).")
        if tracker.store is not None:  # a run opened again appends: the earlier sessions' replicates stay
            with tracker.store.reader() as run:
                earlier = run.artifact(REPLICATES_ARTIFACT, default=None)
            if earlier is not None:
                self.rows = [(int(a), str(b), str(c), str(d), int(e), float(f)) for a, b, c, d, e, f in earlier.itertuples(index=False)]

    def on_features(self, tracker: Tracker, step: int, features: dict[str, Any]) -> Any:
        if not self._due(step) or not features:
            return None
        feats = {k: v.detach().clone() for k, v in features.items()}
        mode = tracker.modes[0]
        conventions = tracker.conventions
        spec = tracker.metric_spec
        rng = np.random.default_rng([self.seed, int(step)])

        def job() -> None:
            new = []
            for layer, X in feats.items():
                n = int(X.shape[0])
                for b in range(self.n_boot):
                    idx = rng.integers(0, n, n)
                    Xb = X[idx]
                    for conv in conventions:
                        s = tracker.features_to_spectrum(Xb, conv == "centered")
                        for metric, v in compute_metrics(s, spec).items():
                            new.append((int(step), layer, metric, tracker.convention_name(mode, conv), b, float(v)))
            self.rows = [r for r in self.rows if r[0] != int(step)] + new  # a step measured again: its latest replicates
            if tracker.store is not None:
                tracker.store.put_artifact(REPLICATES_ARTIFACT, self.frame(), meta={"n_boot": self.n_boot})

        return job

    def frame(self) -> pd.DataFrame:
        """The replicates collected so far."""
        return pd.DataFrame(self.rows, columns=["step", "layer", "metric", "convention", "replicate", "value"])


def series_jitter(values: Any) -> float:
    """Measurement-to-measurement jitter: 1.4826·MAD(Δx)/√2, or, when most increments are exactly
    zero (integer-valued metrics such as ``energy_rank``, where the MAD is 0), std(Δx)/√2."""
    v = np.asarray(values, dtype=np.float64)
    s = robust_sigma(v)
    if s == 0.0 and len(v) > 2:
        s = float(np.std(np.diff(v), ddof=1) / np.sqrt(2.0))
    return s


def noise_floor(run: Any, metrics: Iterable[str] | None = None, conventions: Iterable[str] | None = None) -> pd.DataFrame:
    """The noise floor of every (layer, metric, convention) of a run.

    Columns: layer, metric, convention, noise_floor, source ("bootstrap" or "series"),
    n_steps (bootstrapped steps, 0 for the series fallback).
    """
    from ..store import Run, open_run

    r = run if isinstance(run, Run) else open_run(run)
    reps = r.artifact(REPLICATES_ARTIFACT, default=None)
    boot: dict[tuple[str, str, str], tuple[float, int]] = {}
    if reps is not None and len(reps):
        sd = reps.groupby(["layer", "metric", "convention", "step"])["value"].std(ddof=1).reset_index()
        for (layer, metric, conv), g in sd.groupby(["layer", "metric", "convention"]):
            boot[(str(layer), str(metric), str(conv))] = (float(np.median(g["value"])), int(len(g)))
    sc = r.scalars(space="activation")
    if metrics is not None:
        sc = sc[sc["metric"].isin(list(metrics))]
    if conventions is not None:
        sc = sc[sc["convention"].isin(list(conventions))]
    rows = []
    for (layer, metric, conv), g in sc.groupby(["layer", "metric", "convention"], sort=False):
        key = (str(layer), str(metric), str(conv))
        if key in boot:
            rows.append({"layer": key[0], "metric": key[1], "convention": key[2], "noise_floor": boot[key][0], "source": "bootstrap", "n_steps": boot[key][1]})
        else:
            v = g.drop_duplicates("step", keep="last")["value"].dropna().to_numpy()
            rows.append({"layer": key[0], "metric": key[1], "convention": key[2], "noise_floor": series_jitter(v), "source": "series", "n_steps": 0})
    return pd.DataFrame(rows, columns=["layer", "metric", "convention", "noise_floor", "source", "n_steps"])
