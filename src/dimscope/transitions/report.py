"""Report section: the detector's validity panel, phases, transitions table, correlations and
convention sensitivity — from what :func:`dimscope.analysis.analyze_run` stored in the run."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

__all__ = ["report_section"]


def _html_table(df: pd.DataFrame, max_rows: int = 60) -> str:
    if df is None or len(df) == 0:
        return "<p><em>none</em></p>"
    d = df.head(max_rows).copy()
    for c in d.columns:
        if d[c].dtype.kind == "f":
            d[c] = d[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    out = d.to_html(index=False, border=0, classes="dimscope-table", escape=True)
    if len(df) > max_rows:
        out += f"<p><em>{len(df) - max_rows} more rows not shown.</em></p>"
    return out


def _validity_frame(v: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"fixture": f["name"], "kind": f["kind"], "recall": f.get("recall"), "FP per 1000 steps": f.get("fp_per_1000")} for f in v.get("fixtures", [])]
    )


def _figure(run: Any, events: pd.DataFrame, phases: pd.DataFrame, primary: str, metric: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = run.layers
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 2.2 * len(layers)), sharex=True, squeeze=False)
    colors = {"collapse": "#f4cccc", "expansion": "#d9ead3", "stabilization": "#eeeeee", "other": "#fff2cc"}
    for ax, layer in zip(axes[:, 0], layers):
        try:
            s = run.metric(metric, layer, convention=primary)
        except KeyError:
            continue
        ax.plot(s.index, s.values, lw=0.8, color="k")
        ph = phases[(phases.layer == layer) & (phases.metric == metric)]
        for p in ph.itertuples():
            ax.axvspan(p.start, p.end, color=colors.get(p.label, "#ffffff"), alpha=0.6, lw=0)
        ev = events[(events.layer == layer) & (events.metric == metric)]
        for e in ev.itertuples():
            sig = bool(e.payload.get("significant"))
            ax.axvline(e.step, color="tab:red" if sig else "tab:gray", lw=0.6, alpha=0.8 if sig else 0.3)
        ax.set_ylabel(f"{layer}\n{metric}", fontsize=8)
        ax.set_xscale("symlog", linthresh=max(1, int(s.index[1] - s.index[0]) * 10) if len(s) > 1 else 10)
    axes[-1, 0].set_xlabel("optimizer step (symlog)")
    fig.suptitle(f"{metric} ({primary}): phases shaded (red collapse, green expansion, grey stabilization); red lines significant transitions", fontsize=8)
    fig.tight_layout()
    return fig


def report_section(run: Any) -> Any:
    """The transitions section, or None when the run holds no analysis."""
    from ..report import ReportSection

    validity = run.artifact("transitions/validity", default=None)
    tr = run.events("transition")
    ph = run.events("phase")
    if validity is None and tr.empty and ph.empty:
        return None
    summary = run.artifact("analysis/summary", default={}) or {}
    primary = summary.get("primary", run.default_convention)
    metrics = summary.get("metrics", ["stable_rank"])
    k = summary.get("k", 3.0)
    parts = ["<p>Changes are detected with the detector below; a change is <b>significant</b> when its size is at least "
             f"{k:g} × the metric's noise floor (probe bootstrap where recorded, else the measurement-to-measurement jitter).</p>"]
    figures = {}
    if validity is not None:
        parts.append(f"<h3>Detector validity: {html.escape(str(validity.get('detector')))} — <b>{html.escape(str(validity.get('verdict')))}</b></h3>")
        parts.append(
            f"<p>Mean recall {validity.get('mean_recall', float('nan')):.3f} (needs ≥ {validity.get('min_recall', 0.75)}); "
            f"worst null {validity.get('worst_null_fp_per_1000', float('nan')):.2f} false positives per 1000 steps (needs ≤ {validity.get('max_fp_per_1000', 2.0)}).</p>"
        )
        parts.append(_html_table(_validity_frame(validity)))

    def flat(ev: pd.DataFrame) -> pd.DataFrame:
        if ev.empty:
            return pd.DataFrame()
        p = pd.json_normalize(ev["payload"].tolist())
        return pd.concat([ev[["step", "layer", "metric"]].reset_index(drop=True), p], axis=1)

    phf = flat(ph)
    trf = flat(tr)
    if "convention" in phf:
        phf = phf[phf.convention == primary]
    if "convention" in trf:
        trf_primary = trf[trf.convention == primary]
    else:
        trf_primary = trf
    if len(phf):
        parts.append(f"<h3>Phases ({html.escape(primary)})</h3>")
        parts.append(_html_table(phf[["layer", "metric", "label", "start", "end", "share_of_change"]]))
    if len(trf):
        counts = trf.groupby([c for c in ("convention", "layer", "metric") if c in trf], sort=False).agg(
            detected=("step", "size"), significant=("significant", "sum")
        ).reset_index()
        parts.append("<h3>Transitions per layer and metric</h3>")
        parts.append(_html_table(counts))
        sig = trf_primary[trf_primary["significant"] == True]  # noqa: E712
        parts.append(f"<h3>Significant transitions ({html.escape(primary)})</h3>")
        parts.append(_html_table(sig[[c for c in ("layer", "metric", "step", "size", "noise_floor", "direction", "detector") if c in sig]], max_rows=40))
    corr = run.artifact("analysis/correlations", default=None)
    if corr is not None and len(corr):
        parts.append("<h3>Correlations (Spearman ρ, 95% block-bootstrap interval, lead/lag)</h3>")
        parts.append(_html_table(corr))
    sens = run.artifact("analysis/convention_sensitivity", default=None)
    if sens is not None and len(sens):
        parts.append("<h3>Convention sensitivity: does each conclusion hold under every recorded convention?</h3>")
        parts.append(_html_table(sens, max_rows=80))
    res = run.artifact("analysis/resolution", default=None)
    if res is not None and len(res):
        parts.append("<h3>Sampling resolution: reference transitions still seen when sampling coarser</h3>")
        parts.append(_html_table(res))
    if len(phf) or len(trf_primary):
        try:
            figures["transitions_phases"] = _figure(run, tr[[bool(p.get("convention", primary) == primary) for p in tr["payload"]]] if len(tr) else tr, phf, primary, metrics[0])
            parts.append("{{fig:transitions_phases}}")
        except Exception as e:  # a figure must not sink the report
            parts.append(f"<p><em>figure failed: {html.escape(repr(e))}</em></p>")
    return ReportSection(title="Transitions and phases", html="\n".join(parts), figures=figures, order=20, anchor="transitions")
