"""The staircase section of the report: loss and ε-rank curves, the coincidence table, and the
effect of the first-layer pre-training on steps-to-target and final loss, with the spread over seeds."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from ..report import ReportSection

__all__ = ["report_section", "summary_table"]


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The printed / rendered table: one row per (target, condition), spreads as [min, max]."""

    def rng(a: float, b: float, fmt: str) -> str:
        return "—" if not np.isfinite(a) else f"[{a:{fmt}}, {b:{fmt}}]"

    rows = []
    for _, r in summary.iterrows():
        rows.append({
            "target": r["target"],
            "condition": r["condition"],
            "reached": f"{int(r['reached'])}/{int(r['n_seeds'])}",
            "steps to target (median)": f">{int(r['steps'])}" if r.get("median_censored", False) else f"{r['steps_to_target_median']:.0f}",
            "steps to target [min, max]": rng(r["steps_to_target_min"], r["steps_to_target_max"], ".0f"),
            "final loss (median)": f"{r['final_loss_median']:.2e}",
            "final loss [min, max]": rng(r["final_loss_min"], r["final_loss_max"], ".1e"),
            "loss drops": int(r["loss_drops"]),
            "coinciding with ε-rank step": f"{int(r['coinciding'])} ({r['share']:.0%})" if np.isfinite(r["share"]) else "0",
            "chance share": "—" if not np.isfinite(r["chance_share"]) else f"{r['chance_share']:.0%}",
        })
    return pd.DataFrame(rows)


def _figures(run: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = run.artifact("staircase/loss")
    ranks = run.artifact("staircase/eps_rank")
    layers = [str(x) for x in cfg.get("hidden_layers", sorted(ranks["layer"].astype(str).unique()))]
    ranks["layer"] = ranks["layer"].astype(str)
    figs = {}
    targets = list(dict.fromkeys(loss["target"]))
    colors = {"plain": "tab:blue", "pretrained": "tab:orange"}
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for (cond, seed), g in loss[loss["target"] == t].groupby(["condition", "seed"]):
            ax.semilogy(g["step"], g["loss"], color=colors.get(cond, "gray"), alpha=0.6, lw=0.8, label=cond if seed == g["seed"].min() else None)
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.set_title(f"training loss — {t} (every seed)")
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    figs["staircase_loss"] = fig
    for t in targets:
        sub = ranks[ranks["target"] == t]
        conds = list(dict.fromkeys(sub["condition"]))
        fig, axes = plt.subplots(1, len(conds), figsize=(6.5 * len(conds), 3.8), squeeze=False)
        for ax, cond in zip(axes[0], conds):
            g0 = sub[(sub["condition"] == cond) & (sub["seed"] == sub["seed"].min())]
            lg = loss[(loss["target"] == t) & (loss["condition"] == cond) & (loss["seed"] == sub["seed"].min())]
            for lay in layers:
                gl = g0[g0["layer"] == lay]
                ax.step(gl["step"], gl["eps_rank"], where="post", label=f"layer {lay}")
            ax2 = ax.twinx()
            ax2.semilogy(lg["step"], lg["loss"], color="black", lw=0.7, alpha=0.6)
            ax2.set_ylabel("loss (black)")
            ax.set_title(f"ε-rank per hidden layer — {t}, {cond}, seed {int(sub['seed'].min())}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"ε-rank ({cfg.get('eps_convention', '')})")
            ax.legend(fontsize=7, loc="center right")
        fig.tight_layout()
        figs[f"staircase_eps_{t}"] = fig
    return figs


def report_section(run: Any) -> ReportSection | None:
    """None unless the run holds ``staircase/summary``."""
    if "staircase/summary" not in run.artifacts():
        return None
    cfg = run.artifact("staircase/config", {})
    summary = run.artifact("staircase/summary")
    coin = run.artifact("staircase/coincidence")
    order = run.artifact("staircase/ordering")
    table = summary_table(summary)
    coin["layer"] = coin["layer"].astype(str)
    per_layer = (
        coin.groupby(["target", "condition", "layer"], sort=False)
        .agg(drops=("n_drops", "sum"), coinciding=("n_coinciding", "sum"), eps_steps=("n_eps_steps", "sum"), chance_share=("chance_share", "mean"))
        .reset_index()
    )
    per_layer["share"] = per_layer["coinciding"] / per_layer["drops"].where(per_layer["drops"] > 0)
    finals = [c for c in order.columns if c.startswith("final_")]
    ordering = order.groupby(["target", "condition"], sort=False)[["share_ordered", *finals]].median().reset_index()
    defs = (
        f"ε-rank = #{{eigenvalues of M = ΦᵀWΦ > ε}}, ε = {cfg.get('eps')}, trapezoid weights with ΣW = |Ω|, "
        f"neurons not normalised; measured every {cfg.get('every')} steps. Loss drops: peaks of the smoothed "
        "rate of −log10(loss) at least twice its average rate, taking the loss ≥ 0.1 decade below its previous minimum. A drop coincides with an "
        "ε-rank step if the step lies in the drop's span ± 3 measurement intervals; the chance share is the "
        "mean share under circular shifts of the ε-rank step times. Steps to target: first step with "
        f"loss ≤ {cfg.get('target_rel')}·mean(f²); final loss: median of the last 5 % of steps. "
        f"Seeds: {cfg.get('seeds')}. Pre-training: {cfg.get('pretraining')}."
    )
    h = (
        f"<p>{html.escape(defs, quote=False)}</p>"
        "<h3>Staircase and pre-training (terminal hidden layer)</h3>" + table.to_html(index=False, border=0)
        + "{{fig:staircase_loss}}"
        + "".join(f"{{{{fig:staircase_eps_{t}}}}}" for t in cfg.get("targets", {}))
        + "<h3>Coincidence of loss drops with ε-rank steps, per layer (pooled over seeds)</h3>"
        + per_layer.to_html(index=False, border=0, float_format=lambda v: f"{v:.2f}")
        + "<h3>Per-layer ordering (median over seeds): share of measurements with ε-rank non-decreasing with depth, final ε-rank</h3>"
        + ordering.to_html(index=False, border=0, float_format=lambda v: f"{v:.2f}")
    )
    return ReportSection("ε-rank and the staircase", h, _figures(run, cfg), order=60, anchor="staircase")
