"""The feature formation map: when each class becomes linearly decodable, layer by layer.

:class:`FormationMap` is a :class:`dimscope.TrackerExtension`. Every ``every`` steps (a multiple of
the Tracker's), for each tracked layer, it fits a closed-form ridge probe from the layer's
representation of the probe set to the one-hot class labels, and scores **decodability** of class c
(one-vs-rest) as the ROC AUC of the probe's class-c output on held-out probe samples:

* representation of one probe input: the layer's output, mean-pooled over tokens (B, T, D) or
  positions (B, C, H, W) (``pool="mean"``), or flattened (``pool="flatten"``);
* features standardized (z-scored on the fitting fold), closed-form ridge with intercept, penalty ``alpha``;
* ``folds``-fold stratified cross-fitting (fixed seed): every probe sample is scored by a probe
  fitted without it, and the AUC is computed over all of them. 0.5 = chance, 1 = perfectly decodable.

A class is **decodable** in a layer from the first measured step at which its AUC is ≥ ``threshold``
and stays there for ``patience`` consecutive measurements (:func:`first_decodable`).

Stored in the run: artifact ``"experiments/formation"`` (DataFrame step, layer, class, auc; rewritten
after each measurement, so it can be read live) and ``"experiments/formation_first"`` (layer,
class, first_step; NaN when never decodable) with the parameters in its metadata.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._validation import check_choice, check_float, check_int
from ..capture import resolve_layers
from ..tracker import Tracker, TrackerExtension, _probe_len, probe_forward

__all__ = ["FormationMap", "ridge_decodability", "first_decodable", "ART_FORMATION", "ART_FIRST"]

ART_FORMATION = "experiments/formation"
ART_FIRST = "experiments/formation_first"


def _ridge_fit_predict(Xa: np.ndarray, Ya: np.ndarray, Xb: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form ridge with intercept on z-scored features: fit on (Xa, Ya), predict Xb.

    W = (ZᵀZ + αI)⁻¹ Zᵀ(Y − Ȳ) with Z the standardized Xa (primal form when d ≤ n, the equivalent
    dual form Zᵀ(ZZᵀ + αI)⁻¹(Y − Ȳ) otherwise). Written out because this runs every few steps for
    every layer and sklearn's per-call overhead (~50 ms) would dominate the ~1 ms of algebra.
    """
    mu, sd = Xa.mean(0), Xa.std(0)
    sd[sd < 1e-12] = 1.0
    Za, Zb = (Xa - mu) / sd, (Xb - mu) / sd
    ybar = Ya.mean(0)
    Yc = Ya - ybar
    n, d = Za.shape
    if d <= n:
        W = np.linalg.solve(Za.T @ Za + alpha * np.eye(d), Za.T @ Yc)
        return Zb @ W + ybar
    A = np.linalg.solve(Za @ Za.T + alpha * np.eye(n), Yc)
    return (Zb @ Za.T) @ A + ybar


def _auc(pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = Mann-Whitney U / (n₁ n₀), from average ranks (ties count one half)."""
    from scipy.stats import rankdata

    n1 = int(pos.sum())
    n0 = len(pos) - n1
    r = rankdata(scores)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ridge_decodability(
    X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_classes: int, *, alpha: float = 1.0, folds: int = 2, seed: int = 0
) -> np.ndarray:
    """Per-class one-vs-rest ROC AUC of a cross-fitted ridge probe from ``X`` (n × d) to ``y`` (module docstring).

    A class with fewer than ``folds`` samples, or absent, gets NaN.
    """
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X.detach().to("cpu", torch.float64) if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).astype(int)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"ridge_decodability needs X of shape (n, d) and n labels. Got X {X.shape} and {len(y)} labels.")
    out = np.full(n_classes, np.nan)
    counts = np.bincount(y, minlength=n_classes)
    if not np.all(np.isfinite(X)):
        return out
    Y = np.eye(n_classes)[y]
    strata = np.where(counts[y] >= folds, y, -1)
    scores = np.empty_like(Y)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, strata):
        scores[te] = _ridge_fit_predict(X[tr], Y[tr], X[te], alpha)
    for c in range(n_classes):
        if folds <= counts[c] < len(y):
            out[c] = _auc(y == c, scores[:, c])
    return out


def first_decodable(table: pd.DataFrame, threshold: float = 0.95, patience: int = 2) -> pd.DataFrame:
    """Per (layer, class): the first step whose AUC and the next ``patience``-1 measured ones are ≥ ``threshold``."""
    rows = []
    if table.empty:
        return pd.DataFrame(columns=["layer", "class", "first_step"])
    layer_order = list(dict.fromkeys(table["layer"]))
    for (layer, c), g in table.groupby(["layer", "class"], sort=False):
        g = g.sort_values("step")
        ok = (g["auc"].to_numpy() >= threshold).astype(int)
        steps = g["step"].to_numpy()
        first = float("nan")
        if len(ok) >= patience:
            run = np.convolve(ok, np.ones(patience, dtype=int), mode="valid")
            hit = np.flatnonzero(run == patience)
            if len(hit):
                first = float(steps[hit[0]])
        rows.append({"layer": layer, "class": int(c), "first_step": first})
    df = pd.DataFrame(rows)
    df["_o"] = df["layer"].map({l: i for i, l in enumerate(layer_order)})
    return df.sort_values(["_o", "class"]).drop(columns="_o").reset_index(drop=True)


def _pool(t: torch.Tensor, pool: str, n: int) -> torch.Tensor:
    if t.shape[0] != n:
        raise ValueError(f"A layer output has {t.shape[0]} rows for {n} probe inputs; the formation map needs one row per input.")
    if pool == "flatten" or t.ndim == 2:
        return t.reshape(n, -1)
    if t.ndim == 3:  # (B, T, D): mean over tokens
        return t.mean(1)
    if t.ndim == 4:  # (B, C, H, W): mean over positions
        return t.mean((2, 3))
    return t.reshape(n, -1)


class FormationMap(TrackerExtension):
    """Decodability of each class from each tracked layer, every ``every`` steps (module docstring).

    Parameters
    ----------
    labels:
        The class of each probe input (ints 0 … K-1), in the probe's order.
    every:
        Measure every ``every`` steps; a multiple of the Tracker's ``every`` (default: the Tracker's).
    layers:
        A subset of the Tracker's layers (any selection ``resolve_layers`` accepts); default all.
    alpha, folds, seed:
        Ridge penalty (on standardized features), cross-fitting folds, fold seed.
    threshold, patience:
        The decodability rule of :func:`first_decodable`.
    pool:
        ``"mean"`` (over tokens / positions) or ``"flatten"``.
    """

    name = "formation"
    needs_whole_probe = True  # one label per probe input, and its own probe forward
    runs_own_forward = True

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor | np.ndarray,
        *,
        every: int | None = None,
        layers: Any = None,
        alpha: float = 1.0,
        folds: int = 2,
        seed: int = 0,
        threshold: float = 0.95,
        patience: int = 2,
        pool: str = "mean",
    ) -> None:
        self.labels = labels
        self.every = every
        self.layers = layers
        self.alpha = alpha
        self.folds = folds
        self.seed = seed
        self.threshold = threshold
        self.patience = patience
        self.pool = pool
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._tracker: Tracker | None = None

    def setup(self, tracker: Tracker) -> None:
        owner = "FormationMap"
        if tracker.probe is None:
            raise ValueError("FormationMap needs a Tracker with a probe set (probe mode); got a Tracker without 'probe'.")
        labels = self.labels.detach().cpu() if isinstance(self.labels, torch.Tensor) else np.asarray(self.labels)
        y = torch.as_tensor(labels).long().reshape(-1)
        n = _probe_len(tracker.probe)
        if len(y) != n:
            raise ValueError(f"The 'labels' parameter of FormationMap must hold one label per probe input ({n}). Got {len(y)}.")
        if int(y.min()) < 0:
            raise ValueError(f"The 'labels' parameter of FormationMap must hold ints >= 0. Got {int(y.min())}.")
        self.y_ = y.numpy()
        self.n_classes_ = int(y.max()) + 1
        every = tracker.every if self.every is None else check_int(self.every, "every", min_value=1, owner=owner)
        if every % tracker.every:
            raise ValueError(f"The 'every' parameter of FormationMap must be a multiple of the Tracker's every={tracker.every}. Got {every}.")
        self.every_ = every
        self.layers_ = list(tracker.layers) if self.layers is None else [l for l in resolve_layers(tracker.model, self.layers)]
        missing = [l for l in self.layers_ if l not in tracker.layers]
        if missing:
            raise ValueError(f"The 'layers' parameter of FormationMap must name layers the Tracker tracks. Not tracked: {missing}.")
        check_float(self.alpha, "alpha", low=0.0, low_inclusive=False, owner=owner)
        check_int(self.folds, "folds", min_value=2, owner=owner)
        check_float(self.threshold, "threshold", low=0.0, high=1.0, owner=owner)
        check_int(self.patience, "patience", min_value=1, owner=owner)
        check_choice(self.pool, "pool", ("mean", "flatten"), owner=owner)
        self._tracker = tracker
        if tracker.store is not None:
            tracker.store.set_manifest({"formation": self.params()})

    def params(self) -> dict[str, Any]:
        return {"every": getattr(self, "every_", self.every), "alpha": self.alpha, "folds": self.folds, "seed": self.seed,
                "threshold": self.threshold, "patience": self.patience, "pool": self.pool, "probe": "ridge one-vs-rest, cross-fitted ROC AUC"}

    def _representations(self, tracker: Tracker, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One row per probe input for each layer: the Tracker's own probe features when they already are
        exactly that (no subsampling, one row per input: (B, D) outputs), else a pooled probe forward."""
        n = len(self.y_)
        reusable = tracker.modes[0] == "probe" and tracker.conv == "channels" and (tracker.max_rows is None or n < tracker.max_rows)
        if reusable and all(l in features and features[l].shape[0] == n for l in self.layers_):
            return {l: features[l] for l in self.layers_}
        return self._forward(tracker)

    def _forward(self, tracker: Tracker) -> dict[str, torch.Tensor]:
        n = len(self.y_)
        outs = probe_forward(tracker.model, tracker.probe, self.layers_, batch_size=tracker.probe_batch_size)
        return {l: _pool(t, self.pool, n).detach().to("cpu", torch.float64) for l, t in outs.items()}

    def on_features(self, tracker: Tracker, step: int, features: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        if step % self.every_:
            return None
        reps = self._representations(tracker, features)
        reps = {l: r.detach().to("cpu", torch.float64) for l, r in reps.items()}

        def job() -> None:
            rows = []
            for layer in self.layers_:
                if layer not in reps:
                    continue
                auc = ridge_decodability(reps[layer].numpy(), self.y_, self.n_classes_, alpha=self.alpha, folds=self.folds, seed=self.seed)
                rows.extend({"step": int(step), "layer": layer, "class": c, "auc": float(auc[c])} for c in range(self.n_classes_))
            with self._lock:
                self._rows.extend(rows)
            self._write(tracker, final=False)

        return job

    def table(self) -> pd.DataFrame:
        """Every measurement so far: step, layer, class, auc."""
        with self._lock:
            return pd.DataFrame(self._rows, columns=["step", "layer", "class", "auc"])

    def first_decodable(self) -> pd.DataFrame:
        """layer, class, first_step (NaN when not decodable yet), by the extension's threshold and patience."""
        return first_decodable(self.table(), self.threshold, self.patience)

    def _write(self, tracker: Tracker, final: bool) -> None:
        if tracker.store is None or tracker.store.closed:
            return
        meta = self.params()
        tracker.store.put_artifact(ART_FORMATION, self.table(), meta=meta)
        if final:
            tracker.store.put_artifact(ART_FIRST, self.first_decodable(), meta=meta)

    def close(self, tracker: Tracker) -> None:
        self._write(tracker, final=True)
