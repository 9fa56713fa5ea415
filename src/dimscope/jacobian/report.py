"""Report section for the training Jacobian (artifacts ``jacobian/...`` written by :mod:`.reproduce`)."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from ..report import ReportSection

__all__ = ["report_section"]


def _art(run: Any, name: str) -> Any:
    return run.artifact(f"jacobian/{name}", default=None)


def report_section(run: Any) -> ReportSection | None:
    """sigma_i vs i, log|sigma_i - 1| vs i, region counts for tau in {0.1, 0.01, 1e-3}, the alignment
    curve and the experiment plots; None when the run holds no Jacobian."""
    s = _art(run, "singular_values")
    if s is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .reproduce import comparison_table

    figs: dict[str, Any] = {}
    s = np.asarray(s)
    i = np.arange(1, len(s) + 1)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    ax[0].semilogy(i, s, lw=1)
    ax[0].axhline(1, color="k", lw=0.5)
    ax[0].set(xlabel="i", ylabel="sigma_i", title="singular values of the training Jacobian")
    ax[1].plot(i, np.log10(np.abs(s - 1) + 1e-12), lw=0.6)
    for tau in (0.1, 0.01, 1e-3):
        ax[1].axhline(np.log10(tau), ls="--", lw=0.6, color="gray")
    ax[1].set(xlabel="i", ylabel="log10 |sigma_i - 1|", title="distance from 1 (dashed: tau)")
    fig.tight_layout()
    figs["jacobian_spectrum"] = fig

    al = _art(run, "alignment")
    if al is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        al = np.asarray(al)
        w = max(1, len(al) // 100)
        ax.plot(i, al, ".", ms=1, alpha=0.3)
        ax.plot(i[: len(al) - w + 1], np.convolve(al, np.ones(w) / w, mode="valid"), lw=1.2)
        ax.set(xlabel="i", ylabel="u_i . v_i", title="alignment of left and right singular vectors")
        figs["jacobian_alignment"] = fig

    pt = _art(run, "perturbation")
    if pt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        for idx, g in pt.groupby("index"):
            lab = f"i={idx} (sigma={g['sigma'].iloc[0]:.3g})"
            ax[0].loglog(g["eps"], g["rel_deviation"].clip(lower=1e-12), "o-", label=lab)
            ax[1].semilogx(g["eps"], g["test_loss"], "o-", label=lab)
        ax[0].set(xlabel="eps", ylabel="||dtheta_T - eps J v|| / ||eps J v||", title="perturbing the init along v_i")
        ax[1].set(xlabel="eps", ylabel="test loss")
        ax[0].legend(fontsize=7)
        figs["jacobian_perturbation"] = fig

    kl = _art(run, "kl")
    if kl is not None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for col in [c for c in kl.columns if c not in ("index", "sigma")]:
            ax.semilogy(kl["index"], kl[col].clip(lower=1e-12), ".", ms=2, label=col)
        ax.set(xlabel="singular index i", ylabel="max_x KL", title="adding u_i to the final parameters")
        ax.legend(fontsize=7, markerscale=4)
        figs["jacobian_kl"] = fig

    rs = _art(run, "restricted")
    if rs is not None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        full = rs[rs["region"] == "full"]["test_loss"]
        for (region, comp), g in rs[rs["region"] != "full"].groupby(["region", "complement"]):
            ax.semilogx(g["k"], g["test_loss"], "o-", label=f"{region}{' complement' if comp else ''}")
        if len(full):
            ax.axhline(float(full.iloc[0]), color="k", lw=0.6, label="full training")
        ax.axhline(np.log(10), color="gray", ls="--", lw=0.6, label="chance (log 10)")
        ax.set(xlabel="k (subspace dimension)", ylabel="test loss", title="training restricted to a subspace")
        ax.legend(fontsize=7)
        figs["jacobian_restricted"] = fig

    table = comparison_table({k: _art(run, k) for k in (
        "summary", "regions", "singular_values", "alignment", "perturbation", "kl", "restricted", "variants", "seeds", "overlap")
        if _art(run, k) is not None})
    rows = "".join(
        f"<tr><td>{html.escape(str(q))}</td><td>{v:.4g}</td><td>{html.escape(str(r))}</td></tr>" if isinstance(v, float)
        else f"<tr><td>{html.escape(str(q))}</td><td>{html.escape(str(v))}</td><td>{html.escape(str(r))}</td></tr>"
        for q, v, r in table.itertuples(index=False)
    )
    regions = _art(run, "regions")
    reg_html = regions.to_html(index=False, float_format=lambda x: f"{x:.4g}") if regions is not None else ""
    frag = (
        "<p>Training Jacobian J = d theta_final / d theta_0 through the whole run (Belrose &amp; Scherlis). Regions: chaotic "
        "sigma &gt; 1+tau, bulk |sigma-1| &le; tau, stable sigma &lt; 1-tau.</p>"
        "{{fig:jacobian_spectrum}}" + reg_html +
        "".join(f"{{{{fig:{k}}}}}" for k in ("jacobian_alignment", "jacobian_perturbation", "jacobian_kl", "jacobian_restricted") if k in figs)
        + f"<table><tr><th>quantity</th><th>dimscope</th><th>reference (Belrose &amp; Scherlis, arXiv 2412.07003; n = 4810)</th></tr>{rows}</table>"
    )
    return ReportSection(title="Training Jacobian", html=frag, figures=figs, order=40, anchor="jacobian")
