"""The staircase reproduction (REFERENCE.md §3; Yang, Zhao & Zhu, arXiv 2412.05144).

Setup (ours; the paper's exact tables are not reproduced):

* targets — "1d": f(x) = Σ_{k ∈ {1, 2, 4, 8, 16}} sin(kπx) on [−1, 1], 256 training points on a
  uniform grid; "2d": f(x, y) = Σ_{k ∈ {1, 2, 4, 6}} sin(kπx)·sin(kπy) on [−1, 1]², a 32 × 32 grid;
* model — tanh MLP, 4 hidden layers of 64 (``nn.Sequential``; hidden layers "1", "3", "5", "7"),
  PyTorch's default initialization (seeded), full-batch Adam lr 1e-3, MSE;
* tracking — every ``every`` steps the function-space ε-rank (ε = 1e-3, trapezoid weights summing to
  |Ω|, neurons not normalised) of every hidden layer on a fixed trapezoid grid (257 points in 1-D,
  33 × 33 in 2-D), through a :class:`~dimscope.Tracker` with the
  :class:`~dimscope.staircase.FunctionSpaceEpsRank` extension;
* conditions — "plain" and "pretrained" (:func:`pretrain_first_layer`, method "structured",
  sharpness 1), the same seeds for both;
* read-outs — steps to reach the target loss (relative MSE loss / mean(f²) ≤ ``target_rel``, the
  first such step), the final loss (median over the last 5 % of steps, robust to Adam spikes), and
  the staircase analysis (:func:`analyze_staircase`) of each run.

The representative run (target "1d", "plain", the first seed) is tracked into the run directory
itself, so the report's ordinary curves show it; every run's loss and ε-rank curves, the coincidence
table, the ordering and the summary are stored as artifacts under ``staircase/``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._validation import check_float, check_int
from ..store import RunStore
from ..tracker import Tracker
from .analysis import analyze_staircase
from .epsrank import FunctionSpaceEpsRank, Quadrature, convention_name, trapezoid
from .pretrain import check_pretrain_options, pretrain_first_layer

__all__ = ["TARGETS", "make_target", "tanh_mlp", "train_one", "run_staircase", "summarize", "HIDDEN_LAYERS"]

TARGETS: dict[str, dict[str, Any]] = {
    "1d": {"domain": [(-1.0, 1.0)], "freqs": (1, 2, 4, 8, 16), "train_n": 256, "quad_n": 257},
    "2d": {"domain": [(-1.0, 1.0), (-1.0, 1.0)], "freqs": (1, 2, 4, 6), "train_n": 32, "quad_n": 33},
}
HIDDEN_LAYERS = ["1", "3", "5", "7"]
EPS = 1e-3


def make_target(name: str) -> tuple[torch.Tensor, torch.Tensor, Quadrature, list[tuple[float, float]]]:
    """(training inputs, targets, ε-rank quadrature, domain) of a named target."""
    if name not in TARGETS:
        raise ValueError(f"The 'targets' parameter of run_staircase must hold names among {sorted(TARGETS)}. Got {name!r}.")
    spec = TARGETS[name]
    dom = spec["domain"]
    grid = trapezoid(dom, spec["train_n"]).points
    if len(dom) == 1:
        y = sum(torch.sin(k * math.pi * grid[:, 0]) for k in spec["freqs"])
    else:
        y = sum(torch.sin(k * math.pi * grid[:, 0]) * torch.sin(k * math.pi * grid[:, 1]) for k in spec["freqs"])
    return grid, y[:, None], trapezoid(dom, spec["quad_n"]), dom


def tanh_mlp(d_in: int, width: int = 64, depth: int = 4, seed: int = 0) -> nn.Sequential:
    """``depth`` hidden tanh layers of ``width``; hidden-layer outputs are modules "1", "3", …"""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    w = d_in
    for _ in range(depth):
        mods += [nn.Linear(w, width), nn.Tanh()]
        w = width
    mods.append(nn.Linear(w, 1))
    return nn.Sequential(*mods)


def train_one(
    target: str,
    *,
    seed: int,
    pretrained: bool,
    steps: int,
    every: int,
    lr: float = 1e-3,
    run: str | Path | None = None,
    pretrain: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model; returns {"loss": ndarray per step, "eps_rank": DataFrame step × layer, ...}.

    ``pretrain``: keyword arguments of :func:`pretrain_first_layer` (default method "structured",
    sharpness 1), used when ``pretrained``."""
    x, y, q, dom = make_target(target)
    model = tanh_mlp(x.shape[1], seed=seed)
    pre: dict[str, Any] = {}
    if pretrained:
        kw = {"method": "structured", "sharpness": 1.0, **(pretrain or {})}
        pre = pretrain_first_layer(model, dom, points=q, eps=EPS, seed=seed, **kw).summary()
    ext = FunctionSpaceEpsRank(q, layers=HIDDEN_LAYERS, every=every, eps=EPS)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = np.empty(steps)
    t0 = time.perf_counter()
    with Tracker(
        model, probe=q.points, every=every, layers=HIDDEN_LAYERS, run=None if run is None else str(run), overwrite=True,
        background=False, weight_metrics=run is not None, spectra=None if run is None else "all",
        metrics=None if run is not None else ["stable_rank"], extensions=[ext],
        config={"recipe": "staircase", "target": target, "seed": seed, "pretrained": pretrained, "lr": lr, "steps": steps},
    ) as tracker:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[step] = float(loss.detach())
            tracker.step(step, loss=losses[step])
    hist = pd.DataFrame(ext.history)
    ranks = hist.pivot_table(index="step", columns="layer", values="eps_rank")[HIDDEN_LAYERS]
    return {"loss": losses, "eps_rank": ranks, "seconds": time.perf_counter() - t0, "pretrain": pre,
            "scale": float((y**2).mean())}


def _train_job(job: tuple[Any, ...]) -> dict[str, Any]:
    torch.set_num_threads(1)
    target, seed, pretrained, steps, every, run, pre_kw = job
    return train_one(target, seed=seed, pretrained=pretrained, steps=steps, every=every, run=run, pretrain=pre_kw)


def _run_jobs(
    jobs: list[tuple[Any, ...]], workers: int, done: Callable[[tuple[Any, ...], dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Train every job; results in job order. With workers > 1 in a spawn-context process pool."""
    if workers == 1 or len(jobs) == 1:
        results = []
        for j in jobs:
            results.append(_train_job(j))
            done(j, results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, j): i for i, j in enumerate(jobs)}
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            done(jobs[i], out[i])
    return [out[i] for i in range(len(jobs))]


def _steps_to(loss: np.ndarray, threshold: float) -> float:
    hit = np.nonzero(loss <= threshold)[0]
    return float(hit[0]) if hit.size else float("nan")


def run_staircase(
    run: str | Path,
    *,
    seeds: int | Sequence[int] = 5,
    targets: Sequence[str] = ("1d", "2d"),
    steps: dict[str, int] | int | None = None,
    every: int = 10,
    target_rel: float = 1e-3,
    quick: bool = False,
    pretrain: dict[str, Any] | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the reproduction into ``run`` (overwritten); returns the summary frames.

    ``seeds``: a count (seeds 0…n−1) or a list. ``steps``: per target (default 3000 for 1-D and
    2000 for 2-D; ``quick``: 300 and 200, 2 seeds unless given). ``pretrain``: keyword arguments of
    :func:`pretrain_first_layer` for the "pretrained" condition (default method "structured", sharpness 1).
    ``workers`` > 1 trains that many runs at once in separate processes (one thread each; the
    results are the same as with ``workers=1``).
    """
    pre_kw = {"method": "structured", "sharpness": 1.0, **(pretrain or {})}
    defaults = {k: p.default for k, p in inspect.signature(pretrain_first_layer).parameters.items() if k not in ("model", "domain")}
    unknown = sorted(set(pre_kw) - set(defaults))
    if unknown:
        raise ValueError(f"The 'pretrain' parameter of run_staircase names an unknown option {unknown[0]!r}. Its options: {', '.join(sorted(defaults))}.")
    opts = {**defaults, **pre_kw}
    check_pretrain_options(opts["method"], opts["sharpness"], opts["steps"], opts["lr"],
                           owner="run_staircase (pretrain)")  # before the run is overwritten and trained
    targets = list(targets)
    if not targets:
        raise ValueError("The 'targets' parameter of run_staircase must name at least one target ('1d', '2d'). Got [].")
    workers = check_int(workers, "workers", min_value=1, owner="run_staircase")
    if isinstance(seeds, int):
        seeds = list(range(check_int(seeds, "seeds", min_value=1, owner="run_staircase")))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("The 'seeds' parameter of run_staircase must hold at least one seed. Got [].")
    every = check_int(every, "every", min_value=1, owner="run_staircase")
    target_rel = check_float(target_rel, "target_rel", low=0.0, low_inclusive=False, owner="run_staircase")
    for t in targets:
        make_target(t)
    default = {"1d": 300, "2d": 200} if quick else {"1d": 3000, "2d": 2000}
    if steps is None:
        steps_map = default
    elif isinstance(steps, int):
        steps_map = {t: check_int(steps, "steps", min_value=10, owner="run_staircase") for t in targets}
    else:
        steps_map = {**default, **steps}
    run = Path(run)
    t_start = time.perf_counter()
    loss_rows, rank_rows, coin_rows, order_rows, run_rows, drop_rows = [], [], [], [], [], []
    jobs = [
        (target, seed, pretrained, steps_map[target], every, str(run) if i == 0 else None, pre_kw)
        for i, (target, pretrained, seed) in enumerate((t, p, sd) for t in targets for p in (False, True) for sd in seeds)
    ]

    def done(job: tuple[Any, ...], res: dict[str, Any]) -> None:
        if progress is not None:
            loss = res["loss"]
            hit = _steps_to(loss, target_rel * res["scale"])
            progress(f"{job[0]} {'pretrained' if job[2] else 'plain':10s} seed {job[1]}: steps-to-target "
                     f"{'not reached' if not np.isfinite(hit) else int(hit)}, final loss "
                     f"{np.median(loss[-max(1, len(loss) // 20):]):.2e}, {res['seconds']:.1f} s")

    results = _run_jobs(jobs, workers, done)
    for (target, seed, pretrained, n_steps, _, _, _), res in zip(jobs, results):
        cond = "pretrained" if pretrained else "plain"
        loss = res["loss"]
        ranks: pd.DataFrame = res["eps_rank"]
        key = {"target": target, "condition": cond, "seed": seed}
        stride = max(1, n_steps // 1000)
        loss_rows.append(pd.DataFrame({**key, "step": np.arange(0, n_steps, stride), "loss": loss[::stride]}))
        long = ranks.reset_index().melt(id_vars="step", var_name="layer", value_name="eps_rank")
        rank_rows.append(long.assign(**key))
        smooth = max(5, (n_steps // 100) | 1)
        st = analyze_staircase(pd.Series(loss, index=np.arange(n_steps)), ranks, layers=HIDDEN_LAYERS, loss_smooth=smooth)
        coin_rows.append(st.table.assign(**key))
        if len(st.drops):
            drop_rows.append(st.drops.assign(**key))
        order_rows.append({**key, "share_ordered": st.ordering["share_ordered"],
                           **{f"final_{k}": v for k, v in st.ordering["final"].items()},
                           **{f"initial_{k}": float(ranks[k].iloc[0]) for k in HIDDEN_LAYERS}})
        n_tail = max(1, n_steps // 20)
        run_rows.append({**key, "steps": n_steps, "steps_to_target": _steps_to(loss, target_rel * res["scale"]),
                         "final_loss": float(np.median(loss[-n_tail:])), "min_loss": float(loss.min()),
                         "target_loss": target_rel * res["scale"], "seconds": res["seconds"],
                         "first_layer_eps_rank_init": float(ranks[HIDDEN_LAYERS[0]].iloc[0])})
    runs = pd.DataFrame(run_rows)
    coin = pd.concat(coin_rows, ignore_index=True)
    config = {
        "targets": {t: {**TARGETS[t], "steps": steps_map[t]} for t in targets},
        "seeds": seeds, "every": every, "eps": EPS, "eps_convention": convention_name(EPS), "quadrature": "trapezoid",
        "weights_sum": "|Omega|", "normalize": False, "model": "tanh MLP 4x64", "optimizer": "Adam lr 1e-3 full batch",
        "pretraining": {"function": "pretrain_first_layer", **pre_kw}, "target_rel": target_rel,
        "final_loss": "median of the last 5% of steps", "quick": quick, "hidden_layers": HIDDEN_LAYERS,
        "seconds_total": time.perf_counter() - t_start, "workers": workers,
    }
    summary = summarize(runs, coin)
    store = RunStore(run)
    try:
        store.put_artifact("staircase/config", config)
        store.put_artifact("staircase/runs", runs)
        store.put_artifact("staircase/loss", pd.concat(loss_rows, ignore_index=True))
        store.put_artifact("staircase/eps_rank", pd.concat(rank_rows, ignore_index=True))
        store.put_artifact("staircase/coincidence", coin)
        store.put_artifact("staircase/drops", pd.concat(drop_rows, ignore_index=True) if drop_rows else pd.DataFrame(columns=["step", "start", "end", "size", "target", "condition", "seed"]))
        store.put_artifact("staircase/ordering", pd.DataFrame(order_rows))
        store.put_artifact("staircase/summary", summary)
        store.commit()
    finally:
        store.close()
    return {"runs": runs, "coincidence": coin, "summary": summary, "ordering": pd.DataFrame(order_rows), "config": config}


def summarize(runs: pd.DataFrame, coin: pd.DataFrame) -> pd.DataFrame:
    """Per (target, condition): steps-to-target (median over seeds, a seed that never reaches the
    target counting as later than the last step; min/max over the seeds that reach it) and final loss
    with their spread over seeds, and the
    terminal hidden layer's coincidence share (pooled over seeds) beside its chance share."""
    terminal = HIDDEN_LAYERS[-1]
    out = []
    for (target, cond), g in runs.groupby(["target", "condition"], sort=False):
        stt = g["steps_to_target"].to_numpy()
        reached = np.isfinite(stt)
        # seeds that never reach the target count as "later than the last step" for the median
        med = float(np.median(np.where(reached, stt, np.inf)))
        fl = g["final_loss"].to_numpy()
        c = coin[(coin["target"] == target) & (coin["condition"] == cond) & (coin["layer"] == terminal)]
        n_drops = int(c["n_drops"].sum())
        out.append({
            "target": target,
            "condition": cond,
            "n_seeds": len(g),
            "reached": int(reached.sum()),
            "steps_to_target_median": med if np.isfinite(med) else float("nan"),
            "median_censored": bool(not np.isfinite(med)),
            "steps": int(g["steps"].iloc[0]),
            "steps_to_target_min": float(stt[reached].min()) if reached.any() else float("nan"),
            "steps_to_target_max": float(stt[reached].max()) if reached.any() else float("nan"),
            "final_loss_median": float(np.median(fl)),
            "final_loss_min": float(fl.min()),
            "final_loss_max": float(fl.max()),
            "final_loss_gmean": float(np.exp(np.mean(np.log(fl)))),
            "loss_drops": n_drops,
            "coinciding": int(c["n_coinciding"].sum()),
            "share": float(c["n_coinciding"].sum() / n_drops) if n_drops else float("nan"),
            "chance_share": float(np.nanmean(c["chance_share"])) if c["chance_share"].notna().any() else float("nan"),
        })
    return pd.DataFrame(out)
