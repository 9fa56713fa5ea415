"""``analyze_run``: phases, significant transitions, correlations, noise floors and convention
sensitivity of a stored run, written back into it as events and artifacts.

What it stores (the data contract of DESIGN/BRIEF):

* events ``phase`` (payload label, start, end, share_of_change, delta, convention) and
  ``transition`` (payload detector, size, noise_floor, significant, direction, convention, z),
  one set per recorded convention (previous ones are replaced);
* artifacts ``transitions/validity`` (the detector's validity report), ``analysis/noise_floor``,
  ``analysis/correlations``, ``analysis/convention_sensitivity``, ``analysis/early_share``,
  ``analysis/resolution``.

A transition is **significant** when its size (the two-sided local-linear jump at the change,
see :func:`dimscope.transitions.jump_scores`) is at least ``k`` × the metric's noise floor
(:func:`dimscope.transitions.noise.noise_floor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._validation import check_float, check_int
from ..transitions.detectors import BaseDetector, Pelt
from ..transitions.fixtures import standard_battery
from ..transitions.noise import NOISE_ARTIFACT, noise_floor
from ..transitions.phases import early_share, segment_phases
from ..transitions.resolution import resolution_analysis
from ..transitions.validity import ValidityReport, validate
from .correlation import correlations

__all__ = ["Analysis", "analyze_run", "HEADLINE_METRICS"]

HEADLINE_METRICS: tuple[str, ...] = ("stable_rank", "participation_ratio")


@dataclass
class Analysis:
    """Everything :func:`analyze_run` found (each table has a ``convention`` column)."""

    run: str
    primary: str
    conventions: list[str]
    metrics: list[str]
    k: float
    validity: ValidityReport
    noise: pd.DataFrame
    phases: pd.DataFrame
    transitions: pd.DataFrame
    correlations: pd.DataFrame
    early: pd.DataFrame
    sensitivity: pd.DataFrame
    resolution: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)

    def transition_counts(self) -> pd.DataFrame:
        """Per convention, layer and metric: detected and significant transitions."""
        rows = []
        t = self.transitions
        for e in self.early.itertuples():  # one row per analysed series, zeros included
            tt = t[(t.convention == e.convention) & (t.layer == e.layer) & (t.metric == e.metric)]
            rows.append({"convention": e.convention, "layer": e.layer, "metric": e.metric, "detected": int(len(tt)), "significant": int(tt["significant"].sum()) if len(tt) else 0})
        return pd.DataFrame(rows, columns=["convention", "layer", "metric", "detected", "significant"])


def _phase_string(ph: pd.DataFrame) -> str:
    return " > ".join(f"{r.label}({r.start}-{r.end})" for r in ph.itertuples())


def _sensitivity(a_phases: pd.DataFrame, trans: pd.DataFrame, corr: pd.DataFrame, early: pd.DataFrame, conventions: list[str], layers: list[str], metrics: list[str]) -> pd.DataFrame:
    rows = []
    for layer in layers:
        for m in metrics:
            # 1. the phase sequence (labels only)
            seqs = {}
            for c in conventions:
                ph = a_phases[(a_phases.convention == c) & (a_phases.layer == layer) & (a_phases.metric == m)]
                if len(ph):
                    seqs[c] = " > ".join(ph["label"])
            if seqs:
                rows.append({"layer": layer, "metric": m, "conclusion": "phase sequence", **seqs, "holds": "yes" if len(set(seqs.values())) == 1 and len(seqs) == len(conventions) else "no"})
            # 2. rho with the loss: sign, interval excluding 0
            vals, signs = {}, []
            for c in conventions:
                cc = corr[(corr.convention == c) & (corr.layer == layer) & (corr.metric == m) & (corr.target == "loss")]
                if len(cc):
                    rr = cc.iloc[0]
                    vals[c] = f"{rr.rho:+.3f} [{rr.lo:+.2f}, {rr.hi:+.2f}]"
                    # no sign when ρ or its interval is undefined (a constant series, a single measurement)
                    defined = bool(np.isfinite([rr.rho, rr.lo, rr.hi]).all())
                    signs.append(0 if not defined or rr.lo <= 0 <= rr.hi else int(np.sign(rr.rho)))
            if vals:
                holds = len(signs) == len(conventions) and len(set(signs)) == 1 and signs[0] != 0
                rows.append({"layer": layer, "metric": m, "conclusion": "rho with loss (sign, 95% interval)", **vals, "holds": "yes" if holds else "no"})
            # 3. significant transition count
            counts = {}
            for c in conventions:
                tt = trans[(trans.convention == c) & (trans.layer == layer) & (trans.metric == m)]
                counts[c] = int(tt["significant"].sum()) if len(tt) else 0
            cs = list(counts.values())
            holds = max(cs) <= 1 or min(cs) >= max(cs) / 2
            rows.append({"layer": layer, "metric": m, "conclusion": "significant transitions", **{c: str(v) for c, v in counts.items()}, "holds": "yes" if holds else "no"})
            # 4. share of change in the first 10% of training
            sh = {}
            for c in conventions:
                e = early[(early.convention == c) & (early.layer == layer) & (early.metric == m)]
                if len(e):
                    sh[c] = float(e.iloc[0]["first_10"])
            if sh:
                major = [v >= 0.5 for v in sh.values()]
                rows.append({"layer": layer, "metric": m, "conclusion": "most change in first 10% of steps", **{c: f"{v:.0%}" for c, v in sh.items()}, "holds": "yes" if len(set(major)) == 1 and len(sh) == len(conventions) else "no"})
    cols = ["layer", "metric", "conclusion", *conventions, "holds"]
    return pd.DataFrame(rows, columns=cols)


def analyze_run(
    path: Any,
    *,
    metrics: tuple[str, ...] | list[str] = HEADLINE_METRICS,
    detector: BaseDetector | None = None,
    k: float = 3.0,
    conventions: list[str] | None = None,
    targets: tuple[str, ...] = ("loss", "grad_norm"),
    resolutions: tuple[int, ...] = (25, 100, 500, 1000),
    validity_replicates: int = 10,
    store: bool = True,
    n_boot: int = 200,
) -> Analysis:
    """Analyse a stored run (path or :class:`~dimscope.Run`) under every recorded convention.

    ``detector`` defaults to :class:`~dimscope.transitions.Pelt` with its defaults; its validity
    report on the standard battery is computed (``validity_replicates`` draws per fixture) and
    stored with the results. ``store=False`` only returns the :class:`Analysis`.
    """
    from ..store import Run, RunStore, open_run

    k = check_float(k, "k", low=0.0, owner="analyze_run")
    check_int(validity_replicates, "validity_replicates", min_value=1, owner="analyze_run")
    r = path if isinstance(path, Run) else open_run(path)
    det = detector if detector is not None else Pelt()
    recorded = r.conventions
    primary = r.default_convention if r.default_convention in recorded else (recorded[0] if recorded else r.default_convention)
    if conventions is None:
        convs = [primary] + [c for c in recorded if c != primary]
    else:
        convs = list(conventions)
        if not convs:
            raise ValueError(f"The 'conventions' parameter of analyze_run must name at least one convention (None: every recorded one). Got {conventions!r}.")
        for c in convs:
            if c not in recorded:
                raise ValueError(f"The 'conventions' parameter of analyze_run names {c!r}, not recorded in this run. Recorded: {', '.join(recorded)}.")
        if primary not in convs:  # the primary is one of those analysed
            primary = convs[0]
    stored = set(r.metrics)
    if metrics is HEADLINE_METRICS:  # the default: those of them the run records
        metrics = [m for m in HEADLINE_METRICS if m in stored]
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in stored]
    if unknown:
        raise ValueError(f"The 'metrics' parameter of analyze_run names {unknown[0]!r}, which this run does not record. "
                         f"Recorded: {', '.join(sorted(stored))}.")
    validity = validate(det, standard_battery(replicates=validity_replicates))
    noise = noise_floor(r, metrics=metrics, conventions=convs)
    nf = {(row.layer, row.metric, row.convention): float(row.noise_floor) for row in noise.itertuples()}

    ph_rows, tr_rows, early_rows, res_rows = [], [], [], []
    for c in convs:
        for layer in r.layers:
            for m in metrics:
                try:
                    s = r.metric(m, layer, convention=c).dropna()
                except KeyError:
                    continue
                if len(s) < 8:
                    continue
                x, st = s.to_numpy(float), s.index.to_numpy().astype(np.int64)
                for p in segment_phases(x, st):
                    ph_rows.append({"convention": c, "layer": layer, "metric": m, **p.to_payload()})
                es = early_share(x, st)
                early_rows.append({"convention": c, "layer": layer, "metric": m, "first_10": es[0.1], "first_25": es[0.25]})
                d = det.clone().fit(x, st)
                floor = nf.get((layer, m, c), float("nan"))
                zs = getattr(d, "scores_", None)
                for i, (step, size) in enumerate(zip(d.predict(), d.sizes())):
                    sig = bool(np.isfinite(size) and np.isfinite(floor) and abs(size) >= k * floor)
                    z = float(zs[d.change_indices_[i]]) if zs is not None and np.isfinite(zs[d.change_indices_[i]]) else None
                    tr_rows.append(
                        {"convention": c, "layer": layer, "metric": m, "step": int(step), "size": float(size), "noise_floor": floor if np.isfinite(floor) else None,
                         "significant": sig, "direction": "up" if size > 0 else "down", "detector": d.name, "z": z}
                    )
                if c == primary and resolutions:
                    rr = resolution_analysis(x, st, det, resolutions, noise_floor=floor if np.isfinite(floor) else None, k=k)
                    for row in rr.summary.to_dict("records"):
                        res_rows.append({"layer": layer, "metric": m, **row})
    phases = pd.DataFrame(ph_rows, columns=["convention", "layer", "metric", "label", "start", "end", "share_of_change", "delta"])
    trans = pd.DataFrame(tr_rows, columns=["convention", "layer", "metric", "step", "size", "noise_floor", "significant", "direction", "detector", "z"])
    early = pd.DataFrame(early_rows, columns=["convention", "layer", "metric", "first_10", "first_25"])
    resolution = pd.DataFrame(res_rows)
    corr = pd.concat([correlations(r, tuple(metrics), targets, convention=c, n_boot=n_boot) for c in convs], ignore_index=True)
    sens = _sensitivity(phases, trans, corr, early, convs, r.layers, metrics)
    out = Analysis(str(r.path), primary, convs, metrics, k, validity, noise, phases, trans, corr, early, sens, resolution)
    if store:
        w = RunStore(r.db_path)
        try:
            # the stored analysis is the latest one, whole: its events and tables replace the previous
            # analysis's (keeping other conventions' events would pair them with this run's noise floor,
            # detector and validity)
            w.clear_events("phase")
            w.clear_events("transition")
            for row in ph_rows:
                w.add_event(row["start"], "phase", layer=row["layer"], metric=row["metric"], payload={kk: row[kk] for kk in ("label", "start", "end", "share_of_change", "delta", "convention")})
            for row in tr_rows:
                w.add_event(row["step"], "transition", layer=row["layer"], metric=row["metric"], payload={kk: row[kk] for kk in ("detector", "size", "noise_floor", "significant", "direction", "convention", "z")})
            w.put_artifact("transitions/validity", validity.to_dict())
            w.put_artifact(NOISE_ARTIFACT, noise)
            w.put_artifact("analysis/correlations", corr)
            w.put_artifact("analysis/convention_sensitivity", sens)
            w.put_artifact("analysis/early_share", early)
            w.put_artifact("analysis/resolution", resolution)  # empty too: the stored analysis is this one, whole
            w.put_artifact("analysis/summary", {"primary": primary, "conventions": convs, "metrics": metrics, "k": k, "detector": det.name, "verdict": validity.verdict})
            w.commit()
        finally:
            w.close()
    return out
