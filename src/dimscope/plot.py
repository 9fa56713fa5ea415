"""Plots of a run: each function takes a run (a :class:`~dimscope.store.Run` or a run directory) and
returns a matplotlib :class:`~matplotlib.figure.Figure`.

matplotlib is imported only inside these functions, never by ``import dimscope`` or the training
path. Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas, not through
``pyplot``: no GUI backend is needed, nothing is kept in pyplot's global figure registry, and a
figure displays in a notebook cell as any other figure (``fig`` as the last expression, or
``fig.savefig(path)``).

Conventions shown in every plot
-------------------------------
- The x axis is the **optimizer step** (the integer passed to ``tracker.step``).
- Activation metrics use the run's default convention (``probe/centered`` unless the run says
  otherwise) unless ``convention=`` names another one that the run recorded.
- Only **significant** transitions are marked (events of kind ``"transition"`` whose payload says
  ``"significant": true``, i.e. larger than k times the metric's noise floor); phases are the
  ``"phase"`` events (collapse / expansion / stabilization / other) shaded over their step range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .store import Run

__all__ = [
    "PHASE_COLORS",
    "plot_layer",
    "plot_layers",
    "plot_spectrum_heatmap",
    "plot_activation_vs_weight",
    "plot_metric_vs_loss",
    "plot_validity",
    "validity_thresholds",
    "phase_events",
    "transition_events",
    "spearman_rho",
]

#: Shading colour of each phase label.
PHASE_COLORS: dict[str, str] = {
    "collapse": "#d62728",
    "expansion": "#2ca02c",
    "stabilization": "#1f77b4",
    "other": "#7f7f7f",
}

DEFAULT_METRICS: tuple[str, ...] = ("stable_rank", "participation_ratio")


# -- helpers ---------------------------------------------------------------------------------------
def _as_run(run: Run | str | os.PathLike[str]) -> Run:
    from .store import Run

    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return Run(run)
    raise TypeError(f"The 'run' parameter must be a dimscope Run or a run directory. Got {type(run).__name__} instead.")


def _figure(nrows: int, ncols: int = 1, *, width: float = 9.0, height: float = 2.8, sharex: bool = False) -> tuple[Figure, np.ndarray]:
    """A Figure on the Agg canvas with a grid of axes (always returned as a 2-D array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, max(2.2, height * nrows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex)
    return fig, axes


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _layer_label(layer: str) -> str:
    return layer if layer else "(model)"


def _metric_series(run: Run, metric: str, layer: str, *, space: str = "activation", convention: str | None = None) -> pd.Series | None:
    try:
        return run.metric(metric, layer, space=space, convention=convention).dropna()
    except KeyError:
        return None


def _training_series(run: Run, name: str | None) -> pd.Series | None:
    if not name:
        return None
    try:
        return run.training(name).dropna()
    except KeyError:
        return None


def _payload_ok(payload: Mapping[str, Any], convention: str | None) -> bool:
    conv = payload.get("convention")
    return conv is None or convention is None or conv == convention


def phase_events(run: Run, layer: str | None = None, metric: str | None = None, convention: str | None = None) -> pd.DataFrame:
    """The run's ``"phase"`` events as a table: layer, metric, label, start, end, share_of_change.

    Filtered to ``layer`` / ``metric`` when given; events whose payload names another convention
    than ``convention`` are left out.
    """
    ev = run.events("phase")
    rows = []
    for _, e in ev.iterrows():
        p = e["payload"] or {}
        if layer is not None and e["layer"] != layer:
            continue
        if metric is not None and e["metric"] != metric:
            continue
        if not _payload_ok(p, convention) or p.get("start") is None or p.get("end") is None:
            continue
        rows.append(
            {
                "layer": e["layer"],
                "metric": e["metric"],
                "label": str(p.get("label", "other")),
                "start": int(p["start"]),
                "end": int(p["end"]),
                "share_of_change": p.get("share_of_change"),
            }
        )
    return pd.DataFrame(rows, columns=["layer", "metric", "label", "start", "end", "share_of_change"])


def transition_events(
    run: Run, layer: str | None = None, metric: str | None = None, *, significant: bool | None = None, convention: str | None = None
) -> pd.DataFrame:
    """The run's ``"transition"`` events: step, layer, metric, detector, size, noise_floor, significant, direction.

    ``significant=True`` keeps only those larger than the noise-floor threshold (payload
    ``"significant": true``); ``None`` keeps all.
    """
    ev = run.events("transition")
    rows = []
    for _, e in ev.iterrows():
        p = e["payload"] or {}
        if layer is not None and e["layer"] != layer:
            continue
        if metric is not None and e["metric"] != metric:
            continue
        if not _payload_ok(p, convention) or e["step"] is None or pd.isna(e["step"]):
            continue
        sig = bool(p.get("significant", False))
        if significant is not None and sig != significant:
            continue
        rows.append(
            {
                "step": int(e["step"]),
                "layer": e["layer"],
                "metric": e["metric"],
                "detector": p.get("detector"),
                "size": p.get("size"),
                "noise_floor": p.get("noise_floor"),
                "significant": sig,
                "direction": p.get("direction"),
            }
        )
    cols = ["step", "layer", "metric", "detector", "size", "noise_floor", "significant", "direction"]
    return pd.DataFrame(rows, columns=cols)


def spearman_rho(a: pd.Series, b: pd.Series) -> tuple[float, int]:
    """Spearman ρ between two step-indexed series on their common steps; returns (ρ, n). NaN if n < 3."""
    from scipy.stats import spearmanr

    common = a.index.intersection(b.index)
    n = len(common)
    if n < 3:
        return float("nan"), n
    x, y = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), n
    return float(spearmanr(x, y).statistic), n


def _shade_phases(ax: Axes, phases: pd.DataFrame) -> set[str]:
    seen: set[str] = set()
    for _, p in phases.iterrows():
        color = PHASE_COLORS.get(p["label"], PHASE_COLORS["other"])
        ax.axvspan(p["start"], p["end"], color=color, alpha=0.12, lw=0, label=f"phase: {p['label']}" if p["label"] not in seen else None)
        seen.add(p["label"])
    return seen


def _shared_step_axis(axes: Any, xscale: str, last: float) -> None:
    """One column of panels over the same steps: each scaled up to ``last``, the bottom one labelled."""
    for ax in axes[:, 0]:
        _apply_xscale(ax, xscale, max(last, 1))
    axes[-1, 0].set_xlabel(_step_label(xscale))


def _apply_xscale(ax: Axes, xscale: str, max_step: float) -> None:
    """``"linear"``, or ``"symlog"``: linear up to the power of ten nearest above ``max_step / 100`` (at least
    10 steps), logarithmic beyond; the linear stretch is as wide as one decade."""
    if xscale == "symlog":
        linthresh = 10.0 ** math.ceil(math.log10(max(10.0, float(max_step) / 100.0)))
        ax.set_xscale("symlog", linthresh=linthresh, linscale=1.0)


def _step_label(xscale: str) -> str:
    """The label of a step axis, saying when it is symlog."""
    return "optimizer step" + (" (symlog)" if xscale == "symlog" else "")


def _check_xscale(xscale: str, owner: str) -> str:
    from ._validation import check_choice

    return check_choice(xscale, "xscale", ("linear", "symlog"), owner=owner)


def _loss_twin(ax: Axes, loss: pd.Series | None, name: str) -> Axes | None:
    if loss is None or loss.empty:
        return None
    tw = ax.twinx()
    tw.plot(loss.index, loss.to_numpy(), color="0.6", lw=0.5, alpha=0.6, label=name)
    ax.set_zorder(tw.get_zorder() + 1)  # the metric is drawn above the loss
    ax.patch.set_visible(False)
    if (loss > 0).all() and loss.max() / max(loss.min(), 1e-300) > 20:
        tw.set_yscale("log")
    tw.set_ylabel(name, color="0.45")
    tw.tick_params(axis="y", colors="0.45")
    return tw


# -- per layer -------------------------------------------------------------------------------------
def plot_layer(
    run: Run | str | os.PathLike[str],
    layer: str,
    metrics: Sequence[str] | None = None,
    *,
    convention: str | None = None,
    loss: str | None = "loss",
    phases: bool = True,
    transitions: bool = True,
    xscale: str = "linear",
) -> Figure:
    """One layer: each metric over steps (one panel per metric) with the loss on a twin axis.

    Phases (``"phase"`` events of this layer and metric) are shaded; significant transitions are
    drawn as vertical lines with a ▲/▼ marker at the curve (direction of the change). Transitions
    that are not significant are not drawn; their number is given in the panel's title.
    """
    _check_xscale(xscale, "plot_layer")
    r = _as_run(run)
    if layer not in r.layers:
        raise KeyError(f"The 'layer' parameter of plot_layer must be one of the run's layers {r.layers}. Got {layer!r} instead.")
    metrics = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
    conv = convention or r.default_convention
    series = {m: _metric_series(r, m, layer, convention=conv) for m in metrics}
    series = {m: s for m, s in series.items() if s is not None and not s.empty}
    if not series:
        raise KeyError(f"Layer {layer!r} has none of the metrics {metrics} under convention {conv!r} in this run.")
    loss_s = _training_series(r, loss)
    fig, axes = _figure(len(series), sharex=True)
    for ax, (m, s) in zip(axes[:, 0], series.items()):
        if phases:
            _shade_phases(ax, phase_events(r, layer, m, convention=conv))
        ax.plot(s.index, s.to_numpy(), color="C0", lw=1.0, label=_pretty(m))
        n_sig = n_other = 0
        if transitions:
            tr = transition_events(r, layer, m, convention=conv)
            n_other = int((~tr["significant"]).sum()) if not tr.empty else 0
            sig = tr[tr["significant"]] if not tr.empty else tr
            n_sig = len(sig)
            for k, (_, t) in enumerate(sig.iterrows()):
                ax.axvline(t["step"], color="k", lw=0.8, ls="--", alpha=0.7, label="significant transition" if k == 0 else None)
                pos = s.index.searchsorted(t["step"])
                y = float(s.iloc[min(pos, len(s) - 1)])
                ax.plot([t["step"]], [y], marker="^" if t["direction"] == "up" else "v", color="k", ms=6, ls="none")
        ax.set_ylabel(_pretty(m))
        title = f"{_layer_label(layer)} · {_pretty(m)} ({conv})"
        if transitions:
            title += f" · {n_sig} significant transition{'s' if n_sig != 1 else ''}"
            if n_other:
                title += f" ({n_other} below noise floor, not drawn)"
        ax.set_title(title, fontsize=9)
        tw = _loss_twin(ax, loss_s, loss or "loss")
        handles, labels = ax.get_legend_handles_labels()
        if tw is not None:
            h2, l2 = tw.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="best")
        _apply_xscale(ax, xscale, max(s.index.max(), 1))
    axes[-1, 0].set_xlabel(_step_label(xscale))
    return fig


def plot_layers(
    run: Run | str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    *,
    layers: Sequence[str] | None = None,
    convention: str | None = None,
    loss: str | None = "loss",
    xscale: str = "linear",
) -> Figure:
    """All layers on one axis per metric (ordering across depth, top-down propagation).

    The top panel is the training loss (when recorded). Each layer's curve carries a dot at its
    minimum (the end of its collapse), so the order in which layers turn around is visible.
    """
    _check_xscale(xscale, "plot_layers")
    r = _as_run(run)
    metrics = list(metrics) if metrics is not None else list(DEFAULT_METRICS)
    layers = list(layers) if layers is not None else r.layers
    conv = convention or r.default_convention
    loss_s = _training_series(r, loss)
    panels: list[tuple[str, dict[str, pd.Series]]] = []
    for m in metrics:
        per = {lay: _metric_series(r, m, lay, convention=conv) for lay in layers}
        per = {k: v for k, v in per.items() if v is not None and not v.empty}
        if per:
            panels.append((m, per))
    if not panels:
        raise KeyError(f"None of the metrics {metrics} is stored for layers {layers} under convention {conv!r}.")
    n = len(panels) + (loss_s is not None)
    fig, axes = _figure(n, sharex=True, height=2.6)
    i = 0
    if loss_s is not None:
        ax = axes[0, 0]
        ax.plot(loss_s.index, loss_s.to_numpy(), color="0.35", lw=0.6)
        if (loss_s > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel(loss or "loss")
        ax.set_title(f"training {loss}", fontsize=9)
        i = 1
    for (m, per), ax in zip(panels, axes[i:, 0]):
        for j, (lay, s) in enumerate(per.items()):
            color = f"C{j % 10}"
            ax.plot(s.index, s.to_numpy(), lw=0.9, color=color, label=_layer_label(lay))
            ax.plot([s.idxmin()], [s.min()], "o", color=color, ms=4)
        ax.set_ylabel(_pretty(m))
        ax.set_title(f"{_pretty(m)} of every layer ({conv}); dot = minimum", fontsize=9)
        ax.legend(fontsize=7, loc="best", ncol=min(4, len(per)))
    last = max(max(s.index.max() for s in per.values()) for _, per in panels)
    _shared_step_axis(axes, xscale, last)
    return fig


# -- spectra ---------------------------------------------------------------------------------------
def plot_spectrum_heatmap(
    run: Run | str | os.PathLike[str],
    layer: str,
    *,
    space: str = "activation",
    convention: str | None = None,
    max_columns: int = 800,
    dynamic_range: float = 1e-10,
    overlay: str | None = "participation_ratio",
    xscale: str = "linear",
) -> Figure:
    """The spectrum over time: log10 of the i-th eigenvalue (colour) against step (x) and index i (y).

    Eigenvalues below ``dynamic_range`` times the largest eigenvalue of the whole run are clipped to
    that floor (exact zeros included), so the colour scale spans at most that range. At most
    ``max_columns`` steps are drawn (evenly thinned). ``overlay`` draws a metric of the same layer
    (a number of dimensions) as a white line on the index axis. The dashed line is the ceiling
    min(n−1, d) (centered) or min(n, d) (uncentered).
    """
    from matplotlib.colors import Normalize

    from ._validation import check_choice, check_int

    check_choice(space, "space", ("activation", "weight"), owner="plot_spectrum_heatmap")
    check_int(max_columns, "max_columns", min_value=2, owner="plot_spectrum_heatmap")
    _check_xscale(xscale, "plot_spectrum_heatmap")
    r = _as_run(run)
    specs = r.spectra(layer, space=space, convention=convention)
    if specs.empty:
        raise KeyError(f"No {space} spectra stored for layer {layer!r} (was the Tracker run with spectra=None?).")
    steps = specs.index.to_numpy()
    if len(steps) > max_columns:
        keep = np.unique(np.linspace(0, len(steps) - 1, max_columns).round().astype(int))
        specs = specs.iloc[keep]
        steps = specs.index.to_numpy()
    k = max(len(s.values) for s in specs.values)
    M = np.full((k, len(steps)), np.nan)
    for j, s in enumerate(specs.values):
        M[: len(s.values), j] = s.values
    top = np.nanmax(M) if np.isfinite(M).any() else 1.0
    top = top if top > 0 else 1.0
    floor = top * dynamic_range
    L = np.log10(np.clip(M, floor, None))
    L[np.isnan(M)] = np.nan
    fig, axes = _figure(1, height=3.6)
    ax = axes[0, 0]
    idx = np.arange(1, k + 1)
    mesh = ax.pcolormesh(steps, idx, L, shading="nearest", cmap="magma", norm=Normalize(np.log10(floor), np.log10(top)), rasterized=True)
    cb = fig.colorbar(mesh, ax=ax)
    cb.set_label("log10 eigenvalue")
    first = specs.values[0]
    ceiling = first.ceiling
    ax.axhline(ceiling, color="w", ls=":", lw=0.8, label=f"ceiling min(n{'−1' if first.centered else ''}, d) = {ceiling}")
    conv = convention or (r.default_convention if space == "activation" else "weight")
    if overlay:
        o = _metric_series(r, overlay, layer, space=space, convention=conv)
        if o is not None and not o.empty:
            ax.plot(o.index, o.to_numpy(), color="w", lw=0.9, label=_pretty(overlay))
    if k > 32:
        ax.set_yscale("log")
    ax.set_ylim(idx[-1] + 0.5, 0.5 if k <= 32 else 0.9)
    _apply_xscale(ax, xscale, max(steps.max(), 1))
    ax.set_xlabel(_step_label(xscale))
    ax.set_ylabel("eigenvalue index i")
    trunc = " (stored truncated)" if first.truncated else ""
    ax.set_title(
        f"{_layer_label(layer)} · {space} spectrum over time ({conv}; n = {first.n_samples}, d = {first.n_features}){trunc}", fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right", facecolor="0.3", labelcolor="w", framealpha=0.6)
    return fig


# -- activation vs weight --------------------------------------------------------------------------
def plot_activation_vs_weight(
    run: Run | str | os.PathLike[str],
    metric: str = "stable_rank",
    layers: Sequence[str] | None = None,
    *,
    convention: str | None = None,
    xscale: str = "linear",
) -> Figure:
    """Per layer: ``metric`` of the activations (solid, left axis) and of the weight matrix (dashed, right axis).

    The two spaces have different ceilings (activations: min(n−1, d) of the probe features;
    weights: min(d_out, d_in)), so each has its own axis. Significant transitions of the activation
    metric are ticked at the top of the panel.
    """
    _check_xscale(xscale, "plot_activation_vs_weight")
    r = _as_run(run)
    layers = list(layers) if layers is not None else r.layers
    conv = convention or r.default_convention
    pairs = []
    for lay in layers:
        a = _metric_series(r, metric, lay, convention=conv)
        w = _metric_series(r, metric, lay, space="weight")
        if (a is not None and not a.empty) or (w is not None and not w.empty):
            pairs.append((lay, a, w))
    if not pairs:
        raise KeyError(f"Metric {metric!r} is stored in neither activation nor weight space for layers {layers}.")
    fig, axes = _figure(len(pairs), sharex=True, height=2.3)
    for ax, (lay, a, w) in zip(axes[:, 0], pairs):
        handles = []
        if a is not None and not a.empty:
            handles += ax.plot(a.index, a.to_numpy(), color="C0", lw=0.9, label=f"activation ({conv})")
            ax.set_ylabel(f"activation {_pretty(metric)}", color="C0", fontsize=8)
            sig = transition_events(r, lay, metric, significant=True, convention=conv)
            for s in sig["step"]:
                ax.axvline(s, ymin=0.92, ymax=1.0, color="k", lw=1.0)
        if w is not None and not w.empty:
            tw = ax.twinx()
            handles += tw.plot(w.index, w.to_numpy(), color="C3", lw=1.1, ls="--", label="weight")
            tw.set_ylabel(f"weight {_pretty(metric)}", color="C3", fontsize=8)
        ax.set_title(f"{_layer_label(lay)} · {_pretty(metric)}: activation vs weight space", fontsize=9)
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    last = max(max((s.index.max() for s in (a, w) if s is not None and not s.empty), default=1) for _, a, w in pairs)
    _shared_step_axis(axes, xscale, last)
    return fig


# -- correlations ----------------------------------------------------------------------------------
def plot_metric_vs_loss(
    run: Run | str | os.PathLike[str],
    metric: str = "stable_rank",
    layers: Sequence[str] | None = None,
    *,
    target: str = "loss",
    convention: str | None = None,
) -> Figure:
    """Per layer: ``metric`` against the training scalar ``target`` at the measured steps, coloured by step.

    Each panel's title gives Spearman's ρ (scipy.stats.spearmanr) over the steps where both were
    recorded, and n. ``target`` is the per-step value the user passed to ``tracker.step`` (for the
    loss: the mini-batch loss of that step, so noisy).
    """
    from matplotlib.colors import Normalize

    r = _as_run(run)
    layers = list(layers) if layers is not None else r.layers
    conv = convention or r.default_convention
    tgt = _training_series(r, target)
    if tgt is None:
        raise KeyError(f"The run holds no training scalar {target!r} (the 'target' parameter of plot_metric_vs_loss).")
    data = []
    for lay in layers:
        s = _metric_series(r, metric, lay, convention=conv)
        if s is None or s.empty:
            continue
        common = s.index.intersection(tgt.index)
        if len(common):
            data.append((lay, s, common))
    if not data:
        raise KeyError(f"Metric {metric!r} shares no step with {target!r} for layers {layers}.")
    ncols = min(3, len(data))
    nrows = math.ceil(len(data) / ncols)
    fig, axes = _figure(nrows, ncols, width=3.4 * ncols, height=3.0)
    steps_all = np.concatenate([c.to_numpy() for _, _, c in data])
    norm = Normalize(steps_all.min(), max(steps_all.max(), steps_all.min() + 1))
    sc = None
    for k, (lay, s, common) in enumerate(data):
        ax = axes[k // ncols, k % ncols]
        x = tgt.loc[common].to_numpy(float)
        y = s.loc[common].to_numpy(float)
        sc = ax.scatter(x, y, c=common.to_numpy(), cmap="viridis", norm=norm, s=5, alpha=0.8, lw=0)
        if (x > 0).all() and x.max() / max(x.min(), 1e-300) > 20:
            ax.set_xscale("log")
        rho, n = spearman_rho(s, tgt)
        ax.set_title(f"{_layer_label(lay)}: ρ = {rho:+.3f} (n = {n})", fontsize=9)
        ax.set_xlabel(target)
        ax.set_ylabel(_pretty(metric))
    for k in range(len(data), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    if sc is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), label="optimizer step", shrink=0.8)
    return fig


# -- validity ----------------------------------------------------------------------------------------
_RECALL_KEYS = ("min_recall", "recall_min", "recall_threshold", "min_mean_recall")
_FP_KEYS = ("max_fp_per_1000", "fp_max", "max_false_positives_per_1000", "fp_threshold", "max_fp")


def _param(params: Mapping[str, Any], keys: Sequence[str], default: float) -> float:
    for k in keys:
        v = params.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return default


def validity_thresholds(validity: Mapping[str, Any]) -> tuple[float, float]:
    """(minimum mean recall, maximum false positives per 1000 steps) of a validity record.

    Read from the record's top level (``min_recall``, ``max_fp_per_1000``), else from its ``params``,
    else ndtracker's harness values (0.75, 2).
    """
    params = validity.get("params") or {}
    rmin = _param(validity, _RECALL_KEYS, _param(params, _RECALL_KEYS, 0.75))
    fpmax = _param(validity, _FP_KEYS, _param(params, _FP_KEYS, 2.0))
    return rmin, fpmax


def plot_validity(validity: Mapping[str, Any] | Run | str | os.PathLike[str]) -> Figure:
    """The validity panel of a detector: recall on each positive fixture, false positives per 1000
    steps on each null fixture, each against its threshold, and the verdict in the title.

    ``validity`` is the JSON of the ``"transitions/validity"`` artifact (or a run holding it):
    ``{"detector", "params", "fixtures": [{"name", "kind", "recall", "fp_per_1000"}], "verdict"}``.
    """
    if not isinstance(validity, Mapping):
        validity = _as_run(validity).artifact("transitions/validity")
    fixtures = list(validity.get("fixtures") or [])
    pos = [f for f in fixtures if f.get("kind") == "positive"]
    nul = [f for f in fixtures if f.get("kind") == "null"]
    rmin, fpmax = validity_thresholds(validity)
    verdict = str(validity.get("verdict", "?"))
    fig, axes = _figure(1, 2, width=10, height=3.6)
    for ax, items, key, thr, label, good_below in (
        (axes[0, 0], pos, "recall", rmin, "recall (positive fixtures)", False),
        (axes[0, 1], nul, "fp_per_1000", fpmax, "false positives / 1000 steps (nulls)", True),
    ):
        names = [str(f.get("name")) for f in items]
        vals = [f.get(key) for f in items]
        y = np.array([np.nan if v is None else float(v) for v in vals])
        ok = (y <= thr) if good_below else (y >= thr)
        colors = ["#2ca02c" if o else "#d62728" for o in ok]
        pos_y = np.arange(len(names))
        ax.barh(pos_y, np.nan_to_num(y), color=colors)
        for yy, v in zip(pos_y, y):
            ax.text(0 if np.isnan(v) else v, yy, " n/a" if np.isnan(v) else f" {v:.3g}", va="center", fontsize=7)
        ax.axvline(thr, color="k", ls="--", lw=1, label=f"threshold {'≤' if good_below else '≥'} {thr:g}")
        ax.set_yticks(pos_y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
        finite = y[np.isfinite(y)]
        if key == "recall":
            ax.set_xlim(0, 1.1)
            if len(finite):
                ax.set_title(f"mean recall {finite.mean():.3g} (VALID needs ≥ {thr:g})", fontsize=9)
        elif len(finite):
            ax.set_title(f"worst null {finite.max():.3g} per 1000 steps (VALID needs ≤ {thr:g} on every null)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        if not items:
            ax.text(0.5, 0.5, "no fixtures of this kind", transform=ax.transAxes, ha="center")
    color = "#2ca02c" if verdict.upper() == "VALID" else "#d62728"
    fig.suptitle(f"detector {validity.get('detector', '?')}: {verdict}", color=color, fontsize=11, fontweight="bold")
    return fig
