"""The report section of the precursor analysis: RankMe per layer, probe and held-out accuracy over
steps, the three transition times and the gap. Reads the artifacts ``precursor/...`` of a run."""

from __future__ import annotations

import html as _html
from typing import Any

import pandas as pd

__all__ = ["report_section", "precursor_figure"]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return _html.escape(str(v))


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def precursor_figure(curves: pd.DataFrame, per_seed: pd.DataFrame) -> Any:
    """Rows: RankMe per layer, probe accuracy per layer, held-out accuracy; one column per variant.
    Dashed / dotted / solid vertical lines: t_geo, t_probe, t_beh of each seed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(curves["variant"]))
    fig, axes = plt.subplots(3, len(variants), figsize=(5.5 * len(variants), 8.5), squeeze=False, sharex="col")
    layers = list(dict.fromkeys(curves.loc[curves["metric"] == "rankme", "layer"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, variant in enumerate(variants):
        cv = curves[curves["variant"] == variant]
        seeds = list(dict.fromkeys(cv["seed"]))
        for row, (metric, label) in enumerate((("rankme", "RankMe"), ("probe_acc", "probe accuracy (held out)"), ("behaviour", "accuracy"))):
            ax = axes[row, j]
            for si, seed in enumerate(seeds):
                cs = cv[(cv["seed"] == seed) & (cv["metric"] == metric)]
                if metric == "behaviour":
                    for m, ls, lw, lab in (("unseen_acc", "-", 1.3, "unseen pairs"), ("test_acc", "--", 0.8, "all held out"), ("train_acc", ":", 0.8, "train")):
                        tr = cv[(cv["seed"] == seed) & (cv["metric"] == m)]
                        if not tr.empty:
                            ax.plot(tr["step"], tr["value"], color=colors[si % len(colors)], lw=lw, ls=ls,
                                    label=f"seed {seed} {lab}" if (si == 0 or m == "unseen_acc") else None)
                else:
                    for li, layer in enumerate(layers):
                        cl = cs[cs["layer"] == layer]
                        ax.plot(cl["step"], cl["value"], color=colors[li % len(colors)], lw=1.0, alpha=0.9 if si == 0 else 0.45,
                                label=layer if si == 0 else None)
                ps = per_seed[(per_seed["variant"] == variant) & (per_seed["seed"].astype(str) == str(seed))]
                if not ps.empty:
                    r = ps.iloc[0]
                    for key, ls in (("t_geo", "--"), ("t_probe", "-."), ("t_beh", "-")):
                        v = r.get(key)
                        if v is not None and v == v:
                            ax.axvline(float(v), color="grey", ls=ls, lw=0.7, alpha=0.8)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(f"{variant} (lines: t_geo --, t_probe -., t_beh —)", fontsize=9)
            if row == 2:
                ax.set_xlabel("optimizer step")
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def report_section(run: Any) -> Any:
    """The precursor section, or None when the run holds no ``precursor/summary`` artifact."""
    summary = run.artifact("precursor/summary", default=None)
    if summary is None:
        return None
    from ..precursor_commands import precursor_table, summary_table
    from ..report import ReportSection

    per_seed = run.artifact("precursor/per_seed")
    curves = run.artifact("precursor/curves", default=None)
    per_layer = run.artifact("precursor/per_layer", default=None)
    parts = [
        "<p>Geometry before behaviour (Billa, arXiv 2602.15997): per checkpoint, RankMe of each layer's residual stream at the "
        "answer position, a linear probe's held-out accuracy per layer, and the model's held-out accuracy. "
        "t_geo: RankMe's recovery from its collapse; t_probe: the probe's transition; t_beh: the behavioural one.</p>",
        "<h3>Per seed</h3>",
        _table(precursor_table(per_seed)),
        "<h3>Over seeds</h3>",
        _table(summary_table(summary)),
        f"<p><b>Criterion.</b> {_html.escape(str(summary.get('criterion', '')))}</p>",
    ]
    if per_layer is not None and not per_layer.empty:
        parts += ["<h3>Per layer</h3>", _table(per_layer)]
    figures = {}
    if curves is not None and not curves.empty:
        parts.insert(1, "{{fig:precursor_curves}}")
        figures["precursor_curves"] = precursor_figure(curves, per_seed)
    return ReportSection(title="Geometry before behaviour: the precursor gap", html="\n".join(parts), figures=figures, order=60, anchor="precursor")
