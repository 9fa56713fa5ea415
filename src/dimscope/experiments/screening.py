"""Architecture screening from early dynamics: does the first X % of training predict the final ranking?

Each candidate (a ``model_fn(seed) -> nn.Module``) is trained with a :class:`dimscope.Tracker` on
its ``layers="auto"`` set. When the first ``early_fraction`` of the steps are done, its early scores
are computed from what was measured up to then — nothing later — and training continues to the
end, where the test accuracy is measured. Early scores (m_ℓ(t) = ``metric`` of layer ℓ at the
measured steps t ≤ T_early; each score averages over the candidate's tracked layers):

* ``"expansion"`` (default): log(m_ℓ(T_early) / min_{t ≤ T_early} m_ℓ(t)) — how far the layer has
  re-expanded since its collapse minimum (0 when it is still collapsing);
* ``"growth"``: log(m_ℓ(T_early) / m_ℓ(0)) — the net change since initialization;
* ``"loss_drop"``: log(L(0) / L(T_early)) with L the mean training loss of the first / last 5 % of the
  early steps — a baseline that uses no geometry at all, always reported beside the chosen score.

The answer is Spearman's ρ between each early score and the final accuracy over the candidates,
with a paired percentile bootstrap interval (resampling candidates; resamples where a score or the
accuracy is constant give no ρ and are skipped). With few candidates the interval is wide: it is
reported as is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int
from ..capture import resolve_layers
from ..tracker import Tracker
from ._training import ClassificationData, build_model, train_classifier

__all__ = ["screen", "ScreenResult", "early_scores", "spearman_bootstrap", "SCORES"]

SCORES = ("expansion", "growth", "loss_drop")
ART_TABLE = "experiments/screening"
ART_SUMMARY = "experiments/screening_summary"


@dataclass
class ScreenResult:
    """``table``: one row per candidate and seed (candidate, seed, n_layers, expansion, growth,
    loss_drop, final_accuracy, early_step). ``summary``: per score, ρ, lo, hi, n (and which is primary)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rho(self) -> float:
        return float(self.summary.loc[self.summary["primary"], "rho"].iloc[0])

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the results as artifacts of a run directory (read back by the report)."""
        from ..store import RunStore

        with RunStore(path, overwrite=overwrite) as store:
            store.set_manifest({"experiment": "screening", "config": self.config})
            store.put_artifact(ART_TABLE, self.table)
            store.put_artifact(ART_SUMMARY, {"config": self.config, "scores": self.summary.to_dict(orient="records")})
        return Path(path)


def early_scores(history: pd.DataFrame, loss: Sequence[tuple[int, float]], metric: str, early_step: int) -> dict[str, float]:
    """The three early scores (module docstring) from a Tracker history, using steps <= ``early_step`` only."""
    h = history[(history["space"] == "activation") & (history["metric"] == metric) & (history["step"] <= early_step)]
    exp, gro = [], []
    for _, g in h.groupby("layer"):
        v = g.sort_values("step")["value"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if len(v) < 2 or v.min() <= 0:
            continue
        exp.append(np.log(v[-1] / v.min()))
        gro.append(np.log(v[-1] / v[0]))
    ls = np.array([l for s, l in loss if s <= early_step], dtype=float)
    k = max(1, int(round(0.05 * len(ls))))
    drop = float(np.log(np.mean(ls[:k]) / np.mean(ls[-k:]))) if len(ls) >= 2 else float("nan")
    return {
        "expansion": float(np.mean(exp)) if exp else float("nan"),
        "growth": float(np.mean(gro)) if gro else float("nan"),
        "loss_drop": drop,
    }


def spearman_bootstrap(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Spearman ρ(x, y) and a paired percentile-bootstrap interval (pairs resampled with replacement).

    Written out rather than ``scipy.stats.bootstrap`` because resamples in which x or y is constant
    have no ρ and must be skipped, not turn the whole interval into NaN.
    """
    from scipy.stats import rankdata, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan"), float("nan"), float("nan")
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (n_boot, len(x)))
    xb, yb = x[idx], y[idx]
    keep = (np.ptp(xb, axis=1) > 0) & (np.ptp(yb, axis=1) > 0)
    if not keep.any():
        return rho, float("nan"), float("nan")
    # Spearman ρ of each resample = Pearson correlation of its (average) ranks, all resamples at once
    rx = rankdata(xb[keep], axis=1)
    ry = rankdata(yb[keep], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    stats = (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    a = (1 - confidence) / 2
    lo, hi = np.nanquantile(stats, [a, 1 - a])
    return rho, float(lo), float(hi)


def screen(
    candidates: Mapping[str, Callable[[int], nn.Module]],
    data: ClassificationData,
    *,
    steps: int = 1000,
    early_fraction: float = 0.1,
    score: str = "expansion",
    metric: str = "stable_rank",
    seeds: Sequence[int] = (0,),
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    every: int = 5,
    probe_size: int = 256,
    n_boot: int = 2000,
    confidence: float = 0.95,
    progress: Callable[[str], None] | None = None,
) -> ScreenResult:
    """Train every candidate; score it on its first ``early_fraction`` of steps; report ρ(score, final accuracy).

    With several seeds, each (candidate, seed) is one row; ρ is computed on the per-candidate means.
    """
    owner = "screen"
    data.validate(owner)
    if not isinstance(candidates, Mapping) or len(candidates) < 3:
        n = len(candidates) if isinstance(candidates, Mapping) else type(candidates).__name__
        raise ValueError(f"The 'candidates' parameter of screen must be a mapping name → model_fn with at least 3 entries. Got {n}.")
    steps = check_int(steps, "steps", min_value=2, owner=owner)
    early_fraction = check_float(early_fraction, "early_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, owner=owner)
    check_choice(score, "score", SCORES, owner=owner)
    every = check_int(every, "every", min_value=1, owner=owner)
    seeds = [check_int(s, "seeds", min_value=0, owner=owner) for s in seeds]
    if not seeds:
        raise ValueError("The 'seeds' parameter of screen must hold at least one seed. Got none.")
    early_step = max(every, int(round(early_fraction * steps)))
    early_step -= early_step % every  # the last measured step inside the early window
    if early_step < 2 * every:
        raise ValueError(
            f"The early window of screen ({early_fraction} × {steps} steps) holds fewer than 3 measurements "
            f"at every={every}; raise 'steps' or 'early_fraction', or lower 'every'."
        )
    probe = data.probe(probe_size)
    rows = []
    t0 = time.perf_counter()
    for name, fn in candidates.items():
        layers = resolve_layers(build_model(fn, seeds[0]), "auto")
        for seed in seeds:
            model = build_model(fn, seed)
            tracker = Tracker(model, probe=probe, every=every, layers=layers, metrics=[metric], weight_metrics=False, background=False, spectra=None)
            losses: list[tuple[int, float]] = []
            scores: dict[str, float] = {}

            def on_step(step: int, loss: float, _tr: Tracker = tracker, _losses: list = losses, _scores: dict = scores) -> None:
                _losses.append((step, loss))
                if step == early_step:  # decided now, from what was measured so far
                    _scores.update(early_scores(pd.DataFrame(_tr.history), _losses, metric, early_step))

            try:
                train_classifier(model, data, steps=steps, seed=seed, batch_size=batch_size, lr=lr, optimizer=optimizer, tracker=tracker, on_step=on_step)
            finally:
                tracker.close()
            model.eval()
            with torch.no_grad():
                acc = float((model(data.X_test).argmax(-1) == data.y_test).float().mean())
            rows.append({"candidate": name, "seed": seed, "n_layers": len(layers), **scores, "final_accuracy": acc, "early_step": early_step,
                         "n_parameters": sum(p.numel() for p in model.parameters())})
            if progress is not None:
                progress(f"{name} seed {seed}: " + " ".join(f"{k} {scores.get(k, float('nan')):.3f}" for k in SCORES) + f" final accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    table = pd.DataFrame(rows)
    means = table.groupby("candidate", sort=False)[list(SCORES) + ["final_accuracy"]].mean()
    summary_rows = []
    for s in SCORES:
        rho, lo, hi = spearman_bootstrap(means[s], means["final_accuracy"], n_boot=n_boot, confidence=confidence)
        summary_rows.append({"score": s, "rho": rho, "lo": lo, "hi": hi, "n": int(means[s].notna().sum()), "primary": s == score})
    config = {"steps": steps, "early_fraction": early_fraction, "early_step": early_step, "score": score, "metric": metric, "seeds": list(seeds),
              "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "every": every, "probe_size": int(len(probe)),
              "n_boot": n_boot, "confidence": confidence, "candidates": list(candidates), "elapsed_s": round(time.perf_counter() - t0, 1)}
    return ScreenResult(table, pd.DataFrame(summary_rows), config)
