"""Intervention windows: damage training during one window of steps and see what is lost for good.

For each seed, the same model (same initialization, same mini-batch order) is trained once clean and
once per window ``[start, end)``, the data corrupted only during that window. At the end of each run
the per-class test accuracy is measured; the geometry of the tracked layers is recorded all along by
a :class:`dimscope.Tracker`. Per window:

* **lasting accuracy loss** = clean final accuracy − windowed final accuracy, paired by seed; its mean,
  standard deviation, min / max over seeds and a Student-t 95 % interval of the mean;
* **lasting damage** is flagged when that interval lies above 0 (with one seed: never flagged);
* per class, the same paired loss: which capabilities (classes) the window damaged;
* the geometry curve (``metric`` of each tracked layer over steps) against the clean run's, and the
  relative difference of its final value.

``corruption`` is ``"label_noise"`` (each label replaced with probability ``strength`` by a random
class), ``"input_noise"`` (Gaussian noise of std ``strength`` added to the inputs), or a callable
``corrupt(x, y, step, generator) -> (x, y)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int
from ..capture import LayerSelection, resolve_layers
from ..tracker import Tracker
from ._training import ClassificationData, Corruption, build_model, input_noise, label_noise, per_class_accuracy, train_classifier

__all__ = ["intervention", "InterventionResult", "even_windows"]

ART_SUMMARY = "experiments/intervention"
ART_PER_CLASS = "experiments/intervention_per_class"
ART_CURVES = "experiments/intervention_curves"
ART_CONFIG = "experiments/intervention_config"


@dataclass
class InterventionResult:
    """What :func:`intervention` measured.

    ``summary``: one row per window (and the clean run): window, start, end, accuracy mean/std,
    loss_mean / loss_std / loss_min / loss_max / loss_lo / loss_hi (clean − window, paired by seed),
    n_seeds, lasting, worst_class, worst_class_loss, geometry_final_rel_diff.
    ``per_class``: window, seed, class, accuracy, loss. ``curves``: window, seed, step, layer, metric, value.
    """

    summary: pd.DataFrame
    per_class: pd.DataFrame
    curves: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write the results as artifacts of a run directory (read back by the report)."""
        from ..store import RunStore

        with RunStore(path, overwrite=overwrite) as store:
            store.set_manifest({"experiment": "intervention", "config": self.config})
            store.put_artifact(ART_SUMMARY, self.summary)
            store.put_artifact(ART_PER_CLASS, self.per_class)
            store.put_artifact(ART_CURVES, self.curves)
            store.put_artifact(ART_CONFIG, self.config)
        return Path(path)


def even_windows(steps: int, n: int) -> list[tuple[int, int]]:
    """``n`` consecutive windows of (almost) equal length covering steps 0 … steps-1."""
    steps = check_int(steps, "steps", min_value=1, owner="even_windows")
    n = check_int(n, "n", min_value=1, owner="even_windows")
    edges = np.linspace(0, steps, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _corruption(corruption: str | Corruption, strength: float, n_classes: int) -> Corruption:
    if callable(corruption):
        return corruption
    check_choice(corruption, "corruption", ("label_noise", "input_noise"), owner="intervention")
    if corruption == "label_noise":
        return label_noise(strength, n_classes)
    return input_noise(strength)


def _check_windows(windows: Sequence[tuple[int, int]], steps: int) -> list[tuple[int, int]]:
    out = []
    for w in windows:
        try:
            a, b = (int(w[0]), int(w[1]))
        except (TypeError, IndexError, ValueError):
            raise TypeError(f"The 'windows' parameter of intervention must hold (start, end) pairs of ints. Got {w!r}.") from None
        if not 0 <= a < b <= steps:
            raise ValueError(f"The 'windows' parameter of intervention must hold pairs with 0 <= start < end <= steps={steps}. Got {w!r}.")
        out.append((a, b))
    if not out:
        raise ValueError("The 'windows' parameter of intervention must hold at least one (start, end) pair. Got none.")
    return out


def intervention(
    model_fn: Callable[[int], nn.Module],
    data: ClassificationData,
    *,
    windows: Sequence[tuple[int, int]] | int = 5,
    corruption: str | Corruption = "label_noise",
    strength: float = 1.0,
    steps: int = 1500,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "constant",
    every: int = 25,
    layers: LayerSelection = "auto",
    metric: str = "stable_rank",
    probe_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> InterventionResult:
    """Train once clean and once per window, for each seed; compare the end states (module docstring).

    ``windows`` is a list of ``(start, end)`` step ranges or a number of equal windows covering the
    training. Returns an :class:`InterventionResult`; ``result.save(dir)`` stores it for the report.
    """
    owner = "intervention"
    data.validate(owner)
    steps = check_int(steps, "steps", min_value=2, owner=owner)
    every = check_int(every, "every", min_value=1, owner=owner)
    if isinstance(windows, int) and not isinstance(windows, bool):
        win = even_windows(steps, check_int(windows, "windows", min_value=1, owner=owner))
    else:
        win = _check_windows(windows, steps)
    seeds = [check_int(s, "seeds", min_value=0, owner=owner) for s in seeds]
    if not seeds:
        raise ValueError("The 'seeds' parameter of intervention must hold at least one seed. Got none.")
    if not callable(corruption):
        strength = check_float(strength, "strength", low=0.0, owner=owner)
    corrupt = _corruption(corruption, strength, data.n_classes)
    layer_names = resolve_layers(build_model(model_fn, seeds[0]), layers)
    probe = data.probe(probe_size)
    K = data.n_classes

    per_class_rows: list[dict[str, Any]] = []
    curve_frames: list[pd.DataFrame] = []
    t0 = time.perf_counter()
    runs: list[tuple[str, tuple[int, int] | None]] = [("clean", None)] + [(f"{a}-{b}", (a, b)) for a, b in win]
    for seed in seeds:
        for label, window in runs:
            model = build_model(model_fn, seed)
            tracker = Tracker(
                model, probe=probe, every=every, layers=layer_names, run=None, metrics=[metric],
                weight_metrics=False, background=False, spectra=None,
            )
            try:
                train_classifier(
                    model, data, steps=steps, seed=seed, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                    corrupt=corrupt if window is not None else None, corrupt_window=window, tracker=tracker,
                )
            finally:
                tracker.close()
            acc = per_class_accuracy(model, data.X_test, data.y_test, K)
            model.eval()
            with torch.no_grad():
                overall = float((model(data.X_test).argmax(-1) == data.y_test).float().mean())
            for c in range(K):
                per_class_rows.append({"window": label, "seed": seed, "class": c, "accuracy": acc[c], "overall": overall})
            h = pd.DataFrame(tracker.history)
            if not h.empty:
                h = h[(h["space"] == "activation") & (h["metric"] == metric)][["step", "layer", "metric", "value"]]
                h.insert(0, "seed", seed)
                h.insert(0, "window", label)
                curve_frames.append(h)
            if progress is not None:
                progress(f"seed {seed} window {label}: accuracy {overall:.4f} ({time.perf_counter() - t0:.0f} s)")

    per_class = pd.DataFrame(per_class_rows)
    clean_pc = per_class[per_class["window"] == "clean"].set_index(["seed", "class"])["accuracy"]
    per_class["loss"] = [clean_pc.loc[(s, c)] - a for s, c, a in zip(per_class["seed"], per_class["class"], per_class["accuracy"])]
    curves = pd.concat(curve_frames, ignore_index=True) if curve_frames else pd.DataFrame(columns=["window", "seed", "step", "layer", "metric", "value"])
    summary = _summarize(per_class, curves, runs)
    config = {
        "windows": [list(w) for w in win], "corruption": corruption if isinstance(corruption, str) else getattr(corruption, "__name__", "custom"),
        "strength": strength, "steps": steps, "seeds": list(seeds), "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "schedule": schedule,
        "every": every, "layers": layer_names, "metric": metric, "probe_size": int(len(probe)), "n_test": int(len(data.y_test)),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    return InterventionResult(summary, per_class, curves, config)


def _summarize(per_class: pd.DataFrame, curves: pd.DataFrame, runs: list[tuple[str, tuple[int, int] | None]]) -> pd.DataFrame:
    from scipy.stats import t as student_t

    overall = per_class.drop_duplicates(["window", "seed"]).set_index(["window", "seed"])["overall"]
    clean = overall.loc["clean"]
    final_geo = pd.Series(dtype=float)
    if not curves.empty:
        last = curves.sort_values("step").groupby(["window", "seed", "layer"])["value"].last()
        final_geo = last
    rows = []
    for label, window in runs:
        acc = overall.loc[label]
        loss = (clean - acc.reindex(clean.index)).to_numpy(dtype=float)
        n = len(loss)
        mean = float(np.mean(loss))
        std = float(np.std(loss, ddof=1)) if n > 1 else float("nan")
        if n > 1:
            half = float(student_t.ppf(0.975, n - 1) * std / np.sqrt(n))
            lo, hi = mean - half, mean + half
        else:
            lo = hi = float("nan")
        pc = per_class[per_class["window"] == label].groupby("class")["loss"].mean()
        worst = int(pc.idxmax()) if label != "clean" and pc.notna().any() else -1
        geo = float("nan")
        if len(final_geo) and label != "clean":
            w = final_geo.loc[label]
            c = final_geo.loc["clean"].reindex(w.index)
            geo = float(np.nanmean(((w - c) / c.abs().clip(lower=1e-12)).to_numpy()))
        rows.append({
            "window": label,
            "start": -1 if window is None else window[0],
            "end": -1 if window is None else window[1],
            "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if n > 1 else float("nan"),
            "loss_mean": mean, "loss_std": std, "loss_min": float(np.min(loss)), "loss_max": float(np.max(loss)),
            "loss_lo": lo, "loss_hi": hi, "n_seeds": n,
            "lasting": bool(label != "clean" and n > 1 and lo > 0),
            "worst_class": worst, "worst_class_loss": float(pc.loc[worst]) if worst >= 0 else float("nan"),
            "geometry_final_rel_diff": geo,
        })
    return pd.DataFrame(rows)
