"""End-to-end reproduction of Belrose & Scherlis on ``load_digits`` (REFERENCE.md section 1).

:func:`reproduce` computes the dense Jacobian of the paper's run, its regions and alignment, then
the experiments, storing every result as an artifact ``jacobian/...`` of a run store as soon as it
exists (so a long run that is stopped keeps what it finished):

* ``jacobian/summary`` (JSON): n, sigma_1, top ten, losses, test metrics, method, seconds
* ``jacobian/singular_values``, ``jacobian/alignment`` (arrays)
* ``jacobian/regions`` (DataFrame: tau, chaotic, bulk, stable, bulk_share)
* ``jacobian/perturbation``, ``jacobian/kl``, ``jacobian/restricted`` (DataFrames, see experiments)
* ``jacobian/variants`` (DataFrame: variant, tau, chaotic, bulk, stable, bulk_share) for MSE loss,
  shuffled labels and white-noise inputs; ``jacobian/seeds`` (per seed) and ``jacobian/overlap``
  (bulk-subspace principal angles between seeds).

``quick=True`` shrinks everything (hidden width 8, 2 epochs, few experiments) for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .core import TrainingJacobian, training_jacobian
from .experiments import added_vector_kl, bulk_overlap, evaluate, perturbation_linearity, restricted_training
from .paper import PAPER_TRAINING, digits_data, paper_model

__all__ = ["reproduce", "REFERENCE", "TAUS"]

TAUS = (0.1, 0.01, 1e-3)

#: REFERENCE.md section 1, printed beside the reproduction.
REFERENCE: dict[str, Any] = {
    "sigma_1": 20.47,
    "sigma_10": 14.81,
    "regions": {0.1: (717, 2984, 1109), 0.01: (1171, 1752, 1887), 1e-3: (1482, 998, 2330)},
    "train_loss": 0.028, "test_loss": 0.158, "test_accuracy": 0.954,
    "kl_median": {"train": 1.3e-5, "test": 1.2e-5, "noise": 0.11, "inverted": 0.057},
    "restricted": {("bulk", 100): 2.49, ("bulk", 1000): 2.44, ("bulk", 2000): 2.10, ("bulk", 3000): 1.03,
                   ("chaotic", 100): 0.22, ("stable", 100): 2.35, ("stable", 500): 0.275, ("stable", 1000): 0.173},
    "bulk_shuffled": 2338, "bulk_noise": 862,
}


def _regions_df(tj: TrainingJacobian) -> pd.DataFrame:
    rows = []
    for tau in TAUS:
        r = tj.regions(tau)
        rows.append({"tau": tau, **r.counts, "bulk_share": r.bulk_share})
    return pd.DataFrame(rows)


def reproduce(
    run: str | Path | None = None,
    *,
    quick: bool = False,
    seeds: tuple[int, ...] = (0, 1, 2),
    experiments: tuple[str, ...] = ("perturbation", "kl", "restricted", "variants", "seeds"),
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    variants: tuple[str, ...] = ("mse", "shuffled_labels", "white_noise_inputs"),
) -> dict[str, Any]:
    """Run the reproduction; returns the results (and stores them in ``run`` when given)."""
    from ..store import RunStore

    store = RunStore(run, overwrite=overwrite) if run is not None else None
    results: dict[str, Any] = {}

    def put(name: str, obj: Any) -> None:
        results[name] = obj
        if store is not None:
            store.put_artifact(f"jacobian/{name}", obj)
            store.commit()

    hidden = 8 if quick else 64
    train_kw = dict(PAPER_TRAINING)
    if quick:
        train_kw["epochs"] = 2
    Xtr, ytr, Xte, yte = digits_data()
    if store is not None:
        store.set_manifest({"jacobian": {"quick": quick, "hidden": hidden, **{k: v for k, v in train_kw.items()}}})

    def jac(seed: int, X: torch.Tensor = Xtr, y: torch.Tensor = ytr, **over: Any) -> tuple[Any, TrainingJacobian]:
        model = paper_model(seed, hidden=hidden)
        t = time.perf_counter()
        tj = training_jacobian(model, X, y, **{**train_kw, **over})
        tj.singular_values  # noqa: B018 -- SVD now, timed with the Jacobian
        log(f"  Jacobian seed {seed} {over or ''}: n = {tj.n}, {tj.seconds:.1f} s + SVD {time.perf_counter() - t - tj.seconds:.1f} s ({tj.method} path)")
        return model, tj

    # the main Jacobian is needed by everything but the variants (which compute their own)
    needs_main = not experiments or any(e in experiments for e in ("perturbation", "kl", "restricted", "seeds"))
    tj = None
    if needs_main:
        log("dense training Jacobian of the paper's setup")
        model, tj = jac(seeds[0])
        cfg = tj.config
        tr_loss, tr_acc = evaluate(model, tj.theta_final, Xtr, ytr)
        te_loss, te_acc = evaluate(model, tj.theta_final, Xte, yte)
        s = tj.singular_values.double().numpy()
        put("singular_values", s)
        put("alignment", tj.alignment())
        put("regions", _regions_df(tj))
        put("summary", {
            "n": tj.n, "sigma_1": float(s[0]), "top10": s[:10].tolist(), "train_loss": float(tr_loss[0]),
            "train_accuracy": float(tr_acc[0]), "test_loss": float(te_loss[0]), "test_accuracy": float(te_acc[0]),
            "method": tj.method, "jacobian_seconds": tj.seconds, "quick": quick, "seed": seeds[0],
            "within_1e-4_of_one": int((np.abs(s - 1) <= 1e-4).sum()),
            "exactly_one_expected": int((Xtr.abs().sum(0) == 0).sum()) * hidden + hidden + 1,
        })
        reg = tj.regions(0.1)
        n = tj.n

    if "perturbation" in experiments:
        t = time.perf_counter()
        bulk_mid = int(reg.bulk[len(reg.bulk) // 2]) if len(reg.bulk) else n // 2
        eps = (1e-3, 1e-1, 10.0, 1e3) if quick else (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)
        put("perturbation", perturbation_linearity(model, tj, Xtr, ytr, Xte, yte, indices=[0, bulk_mid], eps=eps, cfg=cfg))
        log(f"  perturbation linearity: {time.perf_counter() - t:.1f} s")

    if "kl" in experiments:
        t = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        inputs = {"train": Xtr, "test": Xte, "noise": torch.randn(len(Xte), Xte.shape[1], generator=g), "inverted": 1.0 - Xte}
        idx = np.arange(1500, 2500) if n >= 2500 else np.arange(n // 3, 2 * n // 3)
        idx = idx[:: 1 if not quick else 4]
        put("kl", added_vector_kl(model, tj, inputs, idx))
        log(f"  KL of added singular vectors: {time.perf_counter() - t:.1f} s")

    if "restricted" in experiments:
        t = time.perf_counter()
        if quick:
            settings = [("bulk", 50, False), ("chaotic", 20, False), ("stable", 20, False), ("bulk", 50, True)]
        else:
            settings = [("bulk", k, False) for k in (100, 1000, 2000, 3000)] + [("chaotic", 100, False), ("bulk", 100, True)] + [
                ("stable", k, False) for k in (100, 500, 1000)]
        put("restricted", restricted_training(model, tj, Xtr, ytr, Xte, yte, settings=settings, cfg=cfg))
        log(f"  restricted training: {time.perf_counter() - t:.1f} s")

    tjs = {seeds[0]: tj} if tj is not None else {}
    if "variants" in experiments:
        rows = []
        g = torch.Generator().manual_seed(1)
        variant_data = {
            "mse": ({"loss": "mse"}, Xtr, ytr),
            "shuffled_labels": ({}, Xtr, ytr[torch.randperm(len(ytr), generator=g)]),
            "white_noise_inputs": ({}, torch.randn(Xtr.shape, generator=g), ytr),
        }
        unknown = set(variants) - set(variant_data)
        if unknown:
            raise ValueError(f"The 'variants' parameter of reproduce must name {sorted(variant_data)}. Got {sorted(unknown)} instead.")
        variant_data = {k: v for k, v in variant_data.items() if k in variants}
        for name, (over, X, y) in variant_data.items():
            _, tv = jac(seeds[0], X, y, **over)
            for rr in _regions_df(tv).to_dict("records"):
                rows.append({"variant": name, **rr})
            put("variants", pd.DataFrame(rows))
            del tv

    if "seeds" in experiments and len(seeds) > 1:
        rows, ov = [], []
        for sd in seeds:
            if sd not in tjs:
                tjs[sd] = jac(sd)[1]
            for rr in _regions_df(tjs[sd]).to_dict("records"):
                rows.append({"seed": sd, **rr})
            put("seeds", pd.DataFrame(rows))
        sl = list(seeds)
        for i in range(len(sl)):
            for j in range(i + 1, len(sl)):
                ov.append({"seed_a": sl[i], "seed_b": sl[j], **bulk_overlap(tjs[sl[i]], tjs[sl[j]])})
        put("overlap", pd.DataFrame(ov))
    if store is not None:
        store.close()
    return results


def comparison_table(results: dict[str, Any]) -> pd.DataFrame:
    """The reproduction's figures beside REFERENCE.md's, one row per quantity."""
    R = REFERENCE
    rows: list[tuple[str, Any, Any]] = []
    sm = results.get("summary", {})
    if sm:
        rows += [("n parameters", sm["n"], 4810), ("sigma_1", sm["sigma_1"], R["sigma_1"]),
                 ("sigma_10", sm["top10"][-1], R["sigma_10"]), ("train loss", sm["train_loss"], R["train_loss"]),
                 ("test loss", sm["test_loss"], R["test_loss"]), ("test accuracy", sm["test_accuracy"], R["test_accuracy"]),
                 ("|sigma - 1| <= 1e-4 (exactly 1 in exact arithmetic: zero pixels x H + H + 1)",
                  f"{sm.get('within_1e-4_of_one')} (expected {sm.get('exactly_one_expected')})", 257)]
    reg = results.get("regions")
    if reg is not None:
        for rec in reg.to_dict("records"):
            ref = R["regions"].get(rec["tau"])
            rows.append((f"tau={rec['tau']:g} chaotic/bulk/stable", f"{rec['chaotic']}/{rec['bulk']}/{rec['stable']}",
                         "/".join(map(str, ref)) if ref else ""))
            rows.append((f"tau={rec['tau']:g} bulk share", f"{rec['bulk_share']:.1%}", f"{ref[1] / 4810:.1%}" if ref else ""))
    al = results.get("alignment")
    if al is not None and reg is not None:
        s = results["singular_values"]
        rows.append(("cos(u_i, v_i) chaotic (sigma>1.1) median", float(np.median(al[s > 1.1])) if (s > 1.1).any() else float("nan"), 0.92))
        rows.append(("cos(u_i, v_i) bulk median", float(np.median(al[np.abs(s - 1) <= 0.1])) if (np.abs(s - 1) <= 0.1).any() else float("nan"), 1.0))
        rows.append(("cos(u_i, v_i) last 100 median", float(np.median(al[-100:])), 0.1))
    pt = results.get("perturbation")
    if pt is not None:
        b = pt[pt["index"] != 0]
        rows.append(("bulk perturbation max rel. deviation from linear (all eps)", float(b["rel_deviation"].max()), "0 (exactly linear)"))
        rows.append(("bulk perturbation test loss at eps=1e3", float(b[b["eps"] == b["eps"].max()]["test_loss"].iloc[0]), 0.165))
        t = pt[pt["index"] == 0]
        rows.append(("top-direction test loss at eps=1e3", float(t[t["eps"] == t["eps"].max()]["test_loss"].iloc[0]), 6.5))
        lin = t[t["rel_deviation"] < 0.1]["eps"]
        rows.append(("top direction linear (<10% dev.) up to eps", float(lin.max()) if len(lin) else float("nan"), "~0.01"))
    kl = results.get("kl")
    if kl is not None:
        for k in ("train", "test", "noise", "inverted"):
            rows.append((f"median max-KL, unit bulk vector, {k}", float(np.median(kl[k])), R["kl_median"][k]))
    rs = results.get("restricted")
    if rs is not None:
        for rec in rs.to_dict("records"):
            key = (rec["region"], rec["k"])
            name = f"restricted {rec['region']}{' complement' if rec['complement'] else ''} k={rec['k']} test loss"
            ref = R["test_loss"] if rec["region"] == "full" else (0.22 if rec["complement"] else R["restricted"].get(key, ""))
            rows.append((name, rec["test_loss"], ref))
    va = results.get("variants")
    if va is not None:
        for rec in va[va["tau"] == 0.1].to_dict("records"):
            ref = {"shuffled_labels": R["bulk_shuffled"], "white_noise_inputs": R["bulk_noise"]}.get(rec["variant"], "")
            rows.append((f"bulk (tau=0.1), {rec['variant']}", rec["bulk"], ref))
    se = results.get("seeds")
    if se is not None:
        for rec in se[se["tau"] == 0.1].to_dict("records"):
            rows.append((f"seed {rec['seed']} chaotic/bulk/stable (tau=0.1)", f"{rec['chaotic']}/{rec['bulk']}/{rec['stable']}", "717/2984/1109"))
    ov = results.get("overlap")
    if ov is not None:
        for rec in ov.to_dict("records"):
            rows.append((f"bulk overlap seeds {rec['seed_a']},{rec['seed_b']} mean cos^2 (random {rec['random_expectation']:.2f})",
                         rec["mean_cos2"], ""))
    return pd.DataFrame(rows, columns=["quantity", "dimscope", "reference"])
