"""Report sections for the experiment templates: formation map, intervention windows, screening."""

from __future__ import annotations

import html as _html
from typing import Any

import numpy as np
import pandas as pd

from .formation import ART_FIRST, ART_FORMATION
from .intervention import ART_CURVES, ART_PER_CLASS, ART_SUMMARY
from .screening import ART_SUMMARY as ART_SCREEN_SUMMARY
from .screening import ART_TABLE as ART_SCREEN_TABLE

__all__ = ["report_section"]


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="—", classes="dimscope-table", border=0)


def _formation_section(run: Any) -> Any:
    from ..report import ReportSection

    table = run.artifact(ART_FORMATION, None)
    if table is None or len(table) == 0:
        return None
    first = run.artifact(ART_FIRST, None)
    plt = _plt()
    layers = list(dict.fromkeys(table["layer"]))
    classes = sorted(table["class"].unique())
    steps = sorted(table["step"].unique())
    vmin = float(np.clip(np.floor(np.nanmin(table["auc"].to_numpy(dtype=float)) * 20) / 20, 0.5, 0.95)) if table["auc"].notna().any() else 0.5
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.0), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        m = table[table["layer"] == layer].pivot(index="class", columns="step", values="auc").reindex(index=classes, columns=steps)
        im = ax.imshow(m.to_numpy(), aspect="auto", vmin=vmin, vmax=1.0, cmap="viridis", origin="lower",
                       extent=(steps[0], steps[-1], -0.5, len(classes) - 0.5), interpolation="nearest")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("step")
        if first is not None:
            f = first[first["layer"] == layer].set_index("class")["first_step"].reindex(classes)
            ax.plot(f.to_numpy(), np.arange(len(classes)), "w|", markersize=8)
    axes[0][0].set_ylabel("class")
    axes[0][0].set_yticks(range(len(classes)), [str(c) for c in classes])
    fig.colorbar(im, ax=axes[0].tolist(), label="decodability (ROC AUC)")
    meta = run.manifest.get("formation", {})
    html = (
        "<p>Linear decodability of each class (one-vs-rest, cross-fitted ridge probe on the probe set, ROC AUC; 0.5 = chance) "
        f"per tracked layer over training. White ticks: first step a class is decodable (AUC ≥ {meta.get('threshold', '?')} for "
        f"{meta.get('patience', '?')} measurements in a row).</p>{{{{fig:formation_map}}}}"
    )
    if first is not None and len(first):
        wide = first.pivot(index="layer", columns="class", values="first_step").reindex(layers).reset_index()
        wide.columns = [str(c) for c in wide.columns]
        html += "<p>First decodable step (— = never):</p>" + _table_html(wide)
    return ReportSection("Feature formation map", html, {"formation_map": fig}, order=80, anchor="formation")


def _intervention_section(run: Any) -> Any:
    from ..report import ReportSection

    summary = run.artifact(ART_SUMMARY, None)
    if summary is None or len(summary) == 0:
        return None
    cfg = run.manifest.get("config", {})
    plt = _plt()
    w = summary[summary["window"] != "clean"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    ax = axes[0]
    x = np.arange(len(w))
    ax.bar(x, w["loss_mean"], yerr=[w["loss_mean"] - w["loss_lo"].fillna(w["loss_mean"]), w["loss_hi"].fillna(w["loss_mean"]) - w["loss_mean"]],
           color=["tab:red" if l else "tab:gray" for l in w["lasting"]], capsize=3)
    per_class = run.artifact(ART_PER_CLASS, None)
    if per_class is not None:
        for i, label in enumerate(w["window"]):
            pts = per_class[per_class["window"] == label].drop_duplicates("seed")
            ax.plot(np.full(len(pts), i), pts["overall"].rsub(summary.set_index("window").loc["clean", "accuracy_mean"]), "k.", ms=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, w["window"], rotation=30, fontsize=8)
    ax.set_ylabel("lasting accuracy loss (clean − window)")
    ax.set_xlabel("corrupted window (steps)")
    curves = run.artifact(ART_CURVES, None)
    ax = axes[1]
    if curves is not None and len(curves):
        layer = sorted(curves["layer"].unique())[0]
        c = curves[curves["layer"] == layer].groupby(["window", "step"])["value"].mean().reset_index()
        for label, g in c.groupby("window", sort=False):
            ax.plot(g["step"], g["value"], lw=1.6 if label == "clean" else 0.9, color="k" if label == "clean" else None, label=label)
        ax.set_title(f"{curves['metric'].iloc[0]} of layer {layer} (mean over seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    html = (
        f"<p>The same model (same initialization and batch order per seed) trained once clean and once per window, the data corrupted "
        f"({_html.escape(str(cfg.get('corruption')))}, strength {cfg.get('strength')}) only during that window. Loss = clean − windowed final "
        f"test accuracy, paired by seed, with a Student-t 95 % interval over {len(cfg.get('seeds', []))} seeds; red = interval above 0 "
        "(lasting damage).</p>{{fig:intervention}}"
    )
    cols = ["window", "accuracy_mean", "loss_mean", "loss_std", "loss_min", "loss_max", "loss_lo", "loss_hi", "lasting", "worst_class", "worst_class_loss", "geometry_final_rel_diff"]
    html += _table_html(summary[cols])
    return ReportSection("Intervention windows", html, {"intervention": fig}, order=81, anchor="intervention")


def _screening_section(run: Any) -> Any:
    from ..report import ReportSection

    table = run.artifact(ART_SCREEN_TABLE, None)
    if table is None or len(table) == 0:
        return None
    info = run.artifact(ART_SCREEN_SUMMARY, {})
    summ = pd.DataFrame(info.get("scores", []))
    cfg = info.get("config", {})
    plt = _plt()
    means = table.groupby("candidate", sort=False).mean(numeric_only=True).reset_index()
    scores = [s for s in ("expansion", "growth", "loss_drop") if s in means]
    fig, axes = plt.subplots(1, len(scores), figsize=(3.4 * len(scores), 3.0), squeeze=False)
    for ax, s in zip(axes[0], scores):
        ax.scatter(means[s], means["final_accuracy"], s=14)
        for _, r in means.iterrows():
            ax.annotate(str(r["candidate"]), (r[s], r["final_accuracy"]), fontsize=6)
        row = summ[summ["score"] == s] if len(summ) else pd.DataFrame()
        title = s if row.empty else f"{s}: ρ = {row['rho'].iloc[0]:.2f} [{row['lo'].iloc[0]:.2f}, {row['hi'].iloc[0]:.2f}]"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"early score (first {cfg.get('early_step', '?')} steps)")
    axes[0][0].set_ylabel("final test accuracy")
    html = (
        f"<p>{len(means)} candidates, each scored from the first {cfg.get('early_step', '?')} of {cfg.get('steps', '?')} steps, then trained "
        "to the end. Spearman ρ between early score and final accuracy with a paired bootstrap interval; <code>loss_drop</code> is a "
        "baseline without geometry.</p>{{fig:screening}}"
    )
    if len(summ):
        html += _table_html(summ)
    return ReportSection("Architecture screening", html, {"screening": fig}, order=82, anchor="screening")


def report_section(run: Any) -> list[Any] | None:
    """The experiment sections the run holds data for (formation map, intervention, screening), or None."""
    sections = [s for s in (_formation_section(run), _intervention_section(run), _screening_section(run)) if s is not None]
    return sections or None
