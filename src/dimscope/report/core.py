"""The core sections of the report: conventions and definitions, overview, per-layer curves,
spectra over time, activation vs weight space, correlations, transitions and phases, and the
validity of the detector.

Transitions, phases, correlations and validity are read from the run store as the transitions
analysis writes them (``"phase"`` / ``"transition"`` / ``"alert"`` events; the
``"transitions/validity"``, ``"analysis/correlations"`` and ``"analysis/noise_floor"``
artifacts). When the run holds none of them the corresponding section says so instead of
guessing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import ReportSection

__all__ = ["report_sections", "conventions_section", "transitions_section", "validity_section", "html_table", "REPORT_METRICS"]

#: The metrics drawn in the overview and per-layer plots (when the run holds them).
REPORT_METRICS: tuple[str, ...] = ("stable_rank", "participation_ratio")

#: Time axes switch to a symlog step axis when the last measured step is at least this.
SYMLOG_FROM_STEP = 1000


# -- small HTML helpers ----------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "—"
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def html_table(df: pd.DataFrame | Sequence[Mapping[str, Any]], *, max_rows: int = 200, caption: str | None = None) -> str:
    """An escaped HTML table of ``df`` (at most ``max_rows`` rows, the rest counted in a note)."""
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(list(df))
    if df.empty:
        return "<p class='note'>(none)</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for row in df.head(max_rows).itertuples(index=False):
        cells = []
        for v in row:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            cells.append(f"<td class='{'num' if num else 'txt'}'>{_e(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    more = f"<p class='note'>… {len(df) - max_rows} more rows not shown.</p>" if len(df) > max_rows else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are already HTML."""
    return "<dl class='kv'>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# -- what the run holds ----------------------------------------------------------------------------
class _Inventory:
    """What the run's scalars table holds (read once per report)."""

    def __init__(self, run: Any) -> None:
        df = run.scalars()
        self.keys = df[["layer", "metric", "space", "convention"]].drop_duplicates()
        act = df[df["space"] == "activation"]
        self.first = int(act["step"].min()) if not act.empty else None
        self.last = int(act["step"].max()) if not act.empty else None
        self.n_measurements = int(act["step"].nunique())

    def metrics_of_layer(self, layer: str, convention: str) -> list[str]:
        k = self.keys
        return list(k.loc[(k["layer"] == layer) & (k["space"] == "activation") & (k["convention"] == convention), "metric"])

    def has_space(self, space: str) -> bool:
        return bool((self.keys["space"] == space).any())


def _report_metrics(run: Any, inv: _Inventory, convention: str) -> list[str]:
    present: set[str] = set()
    for lay in run.layers:
        present.update(inv.metrics_of_layer(lay, convention))
    chosen = [m for m in REPORT_METRICS if m in present]
    return chosen or sorted(present)[:2]


def _xscale(inv: _Inventory) -> str:
    return "symlog" if inv.last is not None and inv.last >= SYMLOG_FROM_STEP else "linear"


def _xscale_note(xscale: str) -> str:
    if xscale == "symlog":
        return (
            " The step axis is <em>symlog</em>: linear over roughly the first 1% of training, logarithmic beyond, so the "
            "early steps where most of the change happens are readable."
        )
    return ""


def _events(run: Any, kind: str) -> pd.DataFrame:
    return run.events(kind)


def _validity(run: Any) -> Mapping[str, Any] | None:
    v = run.artifact("transitions/validity", default=None)
    return v if isinstance(v, Mapping) else None


# -- sections --------------------------------------------------------------------------------------
def _shapes(run: Any, convention: str) -> dict[str, tuple[int, int, bool, int, int]]:
    """(n, d, centered, ceiling, eigenvalues stored) of each layer's first measurement: from its
    stored spectra, else from the description stored with every value (runs without spectra)."""
    out: dict[str, tuple[int, int, bool, int, int]] = {}
    for lay in run.layers:
        specs = run.spectra(lay, convention=convention, limit=1)
        if not specs.empty:
            s0 = specs.iloc[0]
            out[lay] = (int(s0.n_samples), int(s0.n_features), bool(s0.centered), int(s0.ceiling), len(s0.values))
    if len(out) < len(run.layers):
        df = run.scalars(space="activation", convention=convention).dropna(subset=["n_samples"])
        for lay, g in df.groupby("layer", sort=False):
            if lay not in out:
                r = g.iloc[0]
                out[str(lay)] = (int(r.n_samples), int(r.n_features), bool(r.centered), int(r.ceiling), 0)
    return out


def _ceilings(run: Any, convention: str) -> pd.DataFrame:
    rows = []
    for lay, (n, d, centered, ceiling, stored) in _shapes(run, convention).items():
        row: dict[str, Any] = {
            "layer": lay,
            "n (probe rows)": n,
            "d (features)": d,
            "centered": centered,
            "ceiling min(n−1, d)" if centered else "ceiling min(n, d)": ceiling,
            "eigenvalues stored": stored,
        }
        for m in ("participation_ratio", "eps_rank"):
            try:
                row[f"max {m}"] = float(run.metric(m, lay, convention=convention).max())
            except KeyError:
                pass
        eps_max = row.get("max eps_rank")
        row["eps_rank reaches ceiling"] = bool(eps_max is not None and eps_max >= ceiling)
        row["capped by probe size"] = bool(n - (1 if centered else 0) < d and eps_max is not None and eps_max >= ceiling)
        rows.append(row)
    return pd.DataFrame(rows)


def conventions_section(run: Any) -> ReportSection:
    """Definitions and conventions of ``run``: centering, probe, ceilings min(n−1, d), detector, commit policy."""
    return _conventions_section(run, _Inventory(run))


def _metric_params(name: str, given: Mapping[str, Any] | None) -> str:
    """The parameters a metric was computed with: its function's defaults, overridden by the run's."""
    import inspect

    from ..metrics import METRICS

    fn = METRICS.get(name)
    params: dict[str, Any] = {}
    if fn is not None:
        for i, p in enumerate(inspect.signature(fn).parameters.values()):
            if i > 0 and p.default is not inspect.Parameter.empty:
                params[p.name] = p.default
    params.update(given or {})
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _conventions_section(run: Any, inv: _Inventory) -> ReportSection:
    man = run.manifest
    conv = run.default_convention
    first, last, n_meas = inv.first, inv.last, inv.n_measurements
    mode, _, centering = conv.partition("/")
    centered = centering != "uncentered"
    cfg = man.get("config") or {}
    items = [
        ("run", f"<code>{_e(run.path)}</code>"),
        ("model", _e(f"{man.get('model_class', '?')} · {man.get('n_parameters', '?')} parameters")),
        ("layers (module paths)", ", ".join(f"<code>{_e(x)}</code>" for x in run.layers)),
        ("measured", _e(f"every {man.get('every', '?')} optimizer steps, steps {first}–{last}, {n_meas} measurements" if n_meas
                        else f"every {man.get('every', '?')} optimizer steps; no measurement stored yet")),
        ("convention shown", f"<code>{_e(conv)}</code> — mode {_e(mode)} (" + (
            "a fixed probe set, the same inputs at every measurement, under torch.no_grad() in eval mode"
            if mode == "probe" else "the live training mini-batch") + "); "
            + ("<b>centered</b> (column mean subtracted)" if centered else "<b>uncentered</b>")),
        ("conventions recorded", ", ".join(f"<code>{_e(c)}</code>" for c in run.conventions) or "—"),
        ("probe", _e(f"{man.get('probe_size', '—')} inputs, shape {man.get('probe_shape', '—')}, sha256 {man.get('probe_hash', '—')}")),
        ("samples per layer", _e(f"at most {man.get('max_rows')} rows (tokens/positions subsampled with a fixed seed); conv outputs: {man.get('conv')}")),
        ("spectrum", "eigenvalues of C = XᵀX/(n−1) (centered; XᵀX/n uncentered) in float64, from the smaller of XᵀX or XXᵀ; "
            "tiny negative round-off clamped to 0"),
        ("weight space", "σ_i(W)² of each layer's weight matrix reshaped to (out, −1), uncentered, no division by n"
            if man.get("weight_metrics") else "not recorded"),
        ("steps", "optimizer steps as passed to <code>tracker.step</code>, never sample indices"),
        ("commit policy", "SQLite in WAL mode; the writer commits at least every <code>commit_every</code> measurements "
            "(default 10) or <code>commit_seconds</code> (default 2 s), at <code>close()</code> and when training raises; "
            "a killed process keeps every committed measurement"),
        ("versions", _e(f"dimscope {man.get('dimscope_version', '?')} · torch {man.get('torch_version', '?')} · Python {man.get('python_version', '?')}")),
    ]
    if cfg:
        items.append(("config", f"<code>{_e(json.dumps(cfg, default=str))}</code>"))
    defs = man.get("metric_definitions") or {}
    params = man.get("metrics") or {}
    def_rows = [{"metric": k, "definition (λ: eigenvalues, σ = √λ)": v, "parameters": _metric_params(k, params.get(k))} for k, v in defs.items()]
    ceil = _ceilings(run, conv)
    parts = [
        "<p>Every curve in this report is a pure function of one eigen-spectrum per layer and measurement. "
        "A metric cannot exceed the rank ceiling m = min(n−1, d) (centered) or min(n, d) (uncentered), where n is the "
        "number of probe rows and d the layer's width; when n−1 &lt; d the probe size, not the network, caps the value.</p>",
        _dl(items),
        "<h3>Metric definitions</h3>",
        html_table(def_rows) if def_rows else "<p class='note'>The manifest holds no metric definitions.</p>",
        "<h3>Ceilings per layer</h3>",
        html_table(ceil) if not ceil.empty else "<p class='note'>No measurement stored its shape: n, d and the ceiling are unknown.</p>",
        "<h3>Transition detector and thresholds</h3>",
        _detector_html(run),
    ]
    return ReportSection("Conventions and definitions", "\n".join(parts), order=0, anchor="conventions")


def _detector_html(run: Any) -> str:
    val = _validity(run)
    tr = _events(run, "transition")
    detectors = sorted({str(p.get("detector")) for p in tr["payload"] if p.get("detector") is not None}) if not tr.empty else []
    if val is None and not detectors:
        return (
            "<p class='note'>No transition analysis is stored in this run (no <code>transition</code> events, no "
            "<code>transitions/validity</code> artifact): no transition is marked anywhere in this report.</p>"
        )
    from ..plot import validity_thresholds

    items = []
    if detectors:
        items.append(("detector(s) of the stored transitions", ", ".join(f"<code>{_e(d)}</code>" for d in detectors)))
    if val is not None:
        rmin, fpmax = validity_thresholds(val)
        items.append(("validated detector", f"<code>{_e(val.get('detector'))}</code> — verdict <b>{_e(val.get('verdict'))}</b>"))
        items.append(("detector parameters", f"<code>{_e(json.dumps(val.get('params') or {}, default=str))}</code>"))
        items.append(("validity thresholds", _e(f"mean recall ≥ {rmin:g} on the positive fixtures, ≤ {fpmax:g} false positives per 1000 steps on every null")))
    items.append(
        (
            "significance",
            "a detected change is drawn only when its payload says <code>significant</code>: its size exceeds the "
            "threshold times the metric's noise floor"
            + (" (noise floors: <code>analysis/noise_floor</code>, in the Transitions section)" if run.artifact("analysis/noise_floor", default=None) is not None else ""),
        )
    )
    return _dl(items)


def _overview_section(run: Any, metrics: list[str], xscale: str) -> ReportSection:
    from ..plot import plot_layers

    fig = plot_layers(run, metrics, xscale=xscale)
    text = (
        "<p>The training loss, then each metric with every layer on one axis: the ordering of layers across depth and "
        "whether a change starts at one end and propagates. The dot on each curve is its minimum (the end of its "
        "collapse)." + _xscale_note(xscale) + "</p>"
    )
    mins = []
    for m in metrics:
        for lay in run.layers:
            try:
                s = run.metric(m, lay).dropna()
            except KeyError:
                continue
            if s.empty:
                continue
            mins.append({"metric": m, "layer": lay, "initial": float(s.iloc[0]), "minimum": float(s.min()), "step of minimum": int(s.idxmin()), "final": float(s.iloc[-1])})
    return ReportSection("Overview: all layers", text + "{{fig:overview}}" + html_table(mins), {"overview": fig}, order=10, anchor="overview")


def _layer_metrics(run: Any, inv: _Inventory, layer: str, conv: str, base: list[str]) -> list[str]:
    present = inv.metrics_of_layer(layer, conv)
    out = [m for m in base if m in present]
    for kind in ("transition", "phase"):
        ev = _events(run, kind)
        if ev.empty:
            continue
        for m in ev.loc[ev["layer"] == layer, "metric"].dropna().unique():
            if m in present and m not in out and len(out) < 4:
                out.append(str(m))
    return out


def _safe_stem(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s) or "root"


def _layers_section(run: Any, inv: _Inventory, metrics: list[str], xscale: str) -> ReportSection:
    from ..plot import plot_layer

    conv = run.default_convention
    figs: dict[str, Any] = {}
    parts = [
        "<p>Each layer's metrics over optimizer steps, the loss on the right-hand axis (grey). Shaded spans are the "
        "phases found by the transitions analysis (red collapse, green expansion, blue stabilization, grey other); "
        "dashed lines with ▲/▼ are <b>significant</b> transitions only." + _xscale_note(xscale) + "</p>"
    ]
    for lay in run.layers:
        ms = _layer_metrics(run, inv, lay, conv, metrics)
        if not ms:
            continue
        stem = f"layer_{_safe_stem(lay)}"
        figs[stem] = plot_layer(run, lay, ms, xscale=xscale)
        parts.append(f"<h3>Layer <code>{_e(lay)}</code></h3>{{{{fig:{stem}}}}}")
    return ReportSection("Per layer", "\n".join(parts), figs, order=20, anchor="layers")


def _spectra_section(run: Any, xscale: str) -> ReportSection | None:
    from ..plot import plot_spectrum_heatmap

    figs: dict[str, Any] = {}
    parts = [
        "<p>The whole spectrum over time: colour is log10 of the i-th eigenvalue of the layer's covariance at each "
        "measured step (index 1 at the top); the white line is the participation ratio, the dotted line the ceiling. "
        "Eigenvalues below 1e-10 of the largest are clipped to that floor." + _xscale_note(xscale) + "</p>"
    ]
    for lay in run.layers:
        if run.spectra(lay).empty:
            continue
        stem = f"spectrum_{_safe_stem(lay)}"
        figs[stem] = plot_spectrum_heatmap(run, lay, xscale=xscale)
        parts.append(f"<h3>Layer <code>{_e(lay)}</code></h3>{{{{fig:{stem}}}}}")
    if not figs:
        return ReportSection(
            "Spectra over time", "<p class='note'>This run stored no spectra (Tracker(spectra=None)).</p>", order=30, anchor="spectra"
        )
    return ReportSection("Spectra over time", "\n".join(parts), figs, order=30, anchor="spectra")


def _weight_section(run: Any, inv: _Inventory, xscale: str) -> ReportSection | None:
    from ..plot import plot_activation_vs_weight

    if not inv.has_space("weight"):
        return None
    metric = "stable_rank"
    fig = plot_activation_vs_weight(run, metric, xscale=xscale)
    text = (
        "<p>Stable rank of each layer's activations on the probe (solid, left axis) and of its weight matrix (dashed, "
        "right axis). The two live in different spaces with different ceilings, hence two axes. Ticks at the top mark "
        "significant transitions of the activation metric." + _xscale_note(xscale) + "</p>"
    )
    rows = []
    for lay in run.layers:
        try:
            a = run.metric(metric, lay).dropna()
            w = run.metric(metric, lay, space="weight").dropna()
        except KeyError:
            continue
        rows.append(
            {
                "layer": lay,
                "activation: relative change": float((a.iloc[-1] - a.iloc[0]) / a.iloc[0]) if a.iloc[0] else float("nan"),
                "weight: relative change": float((w.iloc[-1] - w.iloc[0]) / w.iloc[0]) if w.iloc[0] else float("nan"),
                "activation: total variation": float(np.abs(np.diff(a.to_numpy())).sum()),
                "weight: total variation": float(np.abs(np.diff(w.to_numpy())).sum()),
            }
        )
    return ReportSection("Activation space vs weight space", text + "{{fig:activation_vs_weight}}" + html_table(rows), {"activation_vs_weight": fig}, order=40, anchor="activation-vs-weight")


def _correlations_section(run: Any, metrics: list[str]) -> ReportSection | None:
    from ..plot import plot_metric_vs_loss, spearman_rho

    try:
        loss = run.training("loss").dropna()
    except KeyError:
        loss = None
    figs: dict[str, Any] = {}
    parts = []
    if loss is not None:
        parts.append(
            "<p>Each metric against the training loss at the measured steps, coloured by step; the panel titles give "
            "Spearman's ρ (scipy.stats.spearmanr) between the metric and the mini-batch loss of the same step.</p>"
        )
        for m in metrics:
            stem = f"scatter_{_safe_stem(m)}"
            try:
                figs[stem] = plot_metric_vs_loss(run, m)
            except KeyError:
                continue
            parts.append(f"<h3>{_e(m.replace('_', ' '))} vs loss</h3>{{{{fig:{stem}}}}}")
    corr = run.artifact("analysis/correlations", default=None)
    if isinstance(corr, pd.DataFrame) and not corr.empty:
        parts.append(
            "<h3>Correlations from the analysis</h3><p>ρ with a bootstrap interval [lo, hi]; <code>best_lag</code> is the "
            "lag (in steps) of the largest cross-correlation and <code>leads</code> whether the metric leads the target.</p>"
        )
        parts.append(html_table(corr))
    elif loss is not None:
        rows = []
        targets = {"loss": loss}
        try:
            targets["grad_norm"] = run.training("grad_norm").dropna()
        except KeyError:
            pass
        for lay in run.layers:
            for m in metrics:
                try:
                    s = run.metric(m, lay).dropna()
                except KeyError:
                    continue
                for tname, t in targets.items():
                    rho, n = spearman_rho(s, t)
                    rows.append({"layer": lay, "metric": m, "target": tname, "rho": rho, "n": n})
        parts.append(
            "<h3>Spearman ρ</h3><p class='note'>No <code>analysis/correlations</code> artifact in this run (no bootstrap "
            "intervals or lags): plain Spearman ρ on the common steps.</p>"
        )
        parts.append(html_table(rows))
    if not parts:
        return None
    return ReportSection("Correlations", "\n".join(parts), figs, order=50, anchor="correlations")


def transitions_section(run: Any) -> ReportSection:
    """Phases, transitions (significant ones listed), alerts and noise floors stored in ``run``."""
    from ..plot import phase_events, transition_events

    conv = run.default_convention  # other conventions: the sensitivity section
    ph = phase_events(run, convention=conv)
    tr = transition_events(run, convention=conv)
    al = _events(run, "alert")
    nf = run.artifact("analysis/noise_floor", default=None)
    parts = []
    if ph.empty and tr.empty and al.empty:
        parts.append(
            "<p class='note'>This run holds no phase, transition or alert events: the transitions analysis has not been "
            "run on it, so no phase is shaded and no transition is marked.</p>"
        )
    if not ph.empty:
        ph = ph.assign(length=ph["end"] - ph["start"])
        parts.append(
            f"<h3>Phases ({_e(conv)})</h3><p>Segments of each metric's curve with their label, steps, and share of the "
            "total change.</p>"
        )
        parts.append(html_table(ph[["layer", "metric", "label", "start", "end", "length", "share_of_change"]]))
    if not tr.empty:
        counts = (
            tr.groupby(["layer", "metric"])
            .agg(significant=("significant", "sum"), detected=("significant", "size"))
            .reset_index()
        )
        counts["significant"] = counts["significant"].astype(int)
        counts["below noise floor"] = counts["detected"] - counts["significant"]
        parts.append(
            f"<h3>Transitions ({_e(conv)})</h3><p>{int(tr['significant'].sum())} significant of {len(tr)} detected changes. Only "
            "significant ones are drawn in the plots.</p>"
        )
        parts.append(html_table(counts))
        sig = tr[tr["significant"]].sort_values(["step", "layer", "metric"])
        parts.append("<h4>Significant transitions</h4>")
        parts.append(html_table(sig[["step", "layer", "metric", "detector", "direction", "size", "noise_floor"]]))
    if not al.empty:
        rows = [
            {"step": None if pd.isna(e["step"]) else int(e["step"]), "layer": e["layer"], "metric": e["metric"], "alert": e["payload"].get("alert"), "message": e["payload"].get("message")}
            for _, e in al.iterrows()
        ]
        parts.append("<h3>Alerts</h3>")
        parts.append(html_table(rows))
    if isinstance(nf, pd.DataFrame) and not nf.empty:
        parts.append("<h3>Noise floors</h3><p>Measurement noise of each metric (bootstrap over probe samples).</p>")
        parts.append(html_table(nf))
    return ReportSection("Transitions and phases", "\n".join(parts), order=60, anchor="transitions")


def validity_section(run: Any) -> ReportSection:
    """The validity panel of the detector (artifact ``transitions/validity``), or a note that it is missing."""
    from ..plot import plot_validity, validity_thresholds

    val = _validity(run)
    if val is None:
        return ReportSection(
            "Detector validity",
            "<p class='note'>No <code>transitions/validity</code> artifact in this run: the detector's recall and false "
            "positive rate were not measured, so its detections should not be trusted.</p>",
            order=70,
            anchor="validity",
        )
    rmin, fpmax = validity_thresholds(val)
    verdict = str(val.get("verdict", "?"))
    cls = "valid" if verdict.upper() == "VALID" else "invalid"
    fixtures = pd.DataFrame(val.get("fixtures") or [])
    text = (
        f"<p>Detector <code>{_e(val.get('detector'))}</code> on planted-transition fixtures (recall) and null controls "
        f"(false positives per 1000 steps). VALID requires mean recall ≥ {rmin:g} and ≤ {fpmax:g} false positives per "
        f"1000 steps on every null. Verdict: <span class='verdict {cls}'>{_e(verdict)}</span></p>"
    )
    return ReportSection("Detector validity", text + "{{fig:validity}}" + html_table(fixtures), {"validity": plot_validity(val)}, order=70, anchor="validity")


def report_sections(run: Any) -> list[ReportSection]:
    """The core sections of the report for ``run`` (a :class:`~dimscope.store.Run`)."""
    conv = run.default_convention
    inv = _Inventory(run)
    metrics = _report_metrics(run, inv, conv)
    xscale = _xscale(inv)
    sections: list[ReportSection | None] = [_conventions_section(run, inv)]
    if metrics:
        sections += [
            _overview_section(run, metrics, xscale),
            _layers_section(run, inv, metrics, xscale),
            _spectra_section(run, xscale),
            _weight_section(run, inv, xscale),
            _correlations_section(run, metrics),
        ]
    sections += [transitions_section(run), validity_section(run)]
    return [s for s in sections if s is not None]
