"""Report section: transition counts per convention, convention sensitivity, early share and sampling
resolution — from what :func:`dimscope.analysis.analyze_run` stored in the run. The phases, the
significant transitions and the detector's validity panel are in the core report."""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["report_section"]


def report_section(run: Any) -> Any:
    """What the transitions analysis adds beside the core report's phases, transitions and validity panel.

    Transition counts under every recorded convention, the convention-sensitivity table, the sampling
    resolution analysis and the early share of change; None when the run holds no analysis.
    """
    from ..report import ReportSection
    from ..report.core import html_table

    tr = run.events("transition")
    sens = run.artifact("analysis/convention_sensitivity", default=None)
    res = run.artifact("analysis/resolution", default=None)
    early = run.artifact("analysis/early_share", default=None)
    if tr.empty and sens is None and res is None and early is None:
        return None
    summary = run.artifact("analysis/summary", default={}) or {}
    k = summary.get("k", 3.0)
    parts = [
        "<p>A change is <b>significant</b> when its size is at least "
        f"{k:g} × the metric's noise floor (probe bootstrap where recorded, else the measurement-to-measurement "
        "jitter). The tables below compare the recorded measurement conventions.</p>"
    ]
    if len(tr):
        p = pd.json_normalize(tr["payload"].tolist())
        trf = pd.concat([tr[["step", "layer", "metric"]].reset_index(drop=True), p], axis=1)
        counts = trf.groupby([c for c in ("convention", "layer", "metric") if c in trf], sort=False).agg(
            detected=("step", "size"), significant=("significant", "sum")
        ).reset_index()
        parts.append("<h3>Transitions per convention, layer and metric</h3>")
        parts.append(html_table(counts))
    if sens is not None and len(sens):
        parts.append("<h3>Convention sensitivity: does each conclusion hold under every recorded convention?</h3>")
        parts.append(html_table(sens, max_rows=80))
    if early is not None and len(early):
        parts.append("<h3>Share of the total change in the first 10% and 25% of training</h3>")
        parts.append(html_table(early))
    if res is not None and len(res):
        parts.append("<h3>Sampling resolution: reference transitions still seen when sampling coarser</h3>")
        parts.append(html_table(res))
    return ReportSection(
        title="Conventions and sampling resolution", html="\n".join(parts), order=65, anchor="sensitivity"
    )
