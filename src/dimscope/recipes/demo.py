"""The demo: REFERENCE.md §2 on ``load_digits`` (MNIST's offline stand-in).

MLP 64-256-128-10 (ReLU), Adam lr 1e-3, batch 64, 8000 steps, dimensionality of the three Linear
outputs measured every 5 steps on a fixed probe set of held-out digits (probe mode, centered).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


import pandas as pd
import torch
from torch import nn

from .._validation import check_int
from ..tracker import Tracker

DEMO_LAYERS = ["0", "2", "4"]


def digits_split(n_probe: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``load_digits`` scaled to [0, 1]: (X_train, y_train, X_probe, y_probe) with a seeded split."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    probe, train = perm[:n_probe], perm[n_probe:]
    return X[train], y[train], X[probe], y[probe]


def demo_model(seed: int = 0, d_in: int = 64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def run_demo(
    run: str | Path = "runs/demo",
    *,
    steps: int = 8000,
    every: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    overwrite: bool = True,
    conventions: tuple[str, ...] = ("centered",),
    progress: Callable[[int], None] | None = None,
    tracker_kwargs: dict[str, Any] | None = None,
    noise_floor: bool = True,
) -> dict[str, Any]:
    """Train the demo MLP with a Tracker; returns {"run": path, "test_accuracy": ..., "final_loss": ...}.

    ``noise_floor`` adds a :class:`~dimscope.transitions.noise.NoiseFloor` extension (probe
    bootstrap at ~8 evenly spaced measurement steps) when probe mode comes first.
    """
    check_int(steps, "steps", min_value=1, owner="run_demo")
    check_int(every, "every", min_value=1, owner="run_demo")
    check_int(batch_size, "batch_size", min_value=1, owner="run_demo")
    Xtr, ytr, Xp, yp = digits_split(seed=seed)
    model = demo_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(Xtr)
    perm = torch.randperm(n, generator=g)
    pos = 0
    kwargs = dict(tracker_kwargs or {})
    mode = kwargs.get("mode", "probe")
    if noise_floor and (mode if isinstance(mode, str) else tuple(mode)[0]) == "probe":
        from ..transitions.noise import NoiseFloor

        nf_every = max(every, (steps // 8) // every * every)
        kwargs["extensions"] = [*kwargs.get("extensions", ()), NoiseFloor(every=nf_every)]
    with Tracker(
        model, probe=Xp, every=every, layers=DEMO_LAYERS, run=str(run), overwrite=overwrite, grad_norm=True,
        conventions=conventions,
        config={"recipe": "demo", "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "data": "load_digits"},
        **kwargs,
    ) as tracker:
        for step in range(steps):
            if pos + batch_size > n:
                perm = torch.randperm(n, generator=g)
                pos = 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            tracker.step(step, loss=loss.item())
            if progress is not None:
                progress(step)
    with torch.no_grad():
        acc = float((model(Xp).argmax(1) == yp).float().mean())
    return {"run": str(run), "test_accuracy": acc, "final_loss": float(loss.item())}


def summary_table(run: Any, metrics: tuple[str, ...] = ("stable_rank", "participation_ratio")) -> pd.DataFrame:
    """Per layer and metric: initial / minimum / final value, the step of the minimum, ρ with the loss."""
    from scipy.stats import spearmanr

    try:
        loss = run.training("loss")
    except KeyError:
        loss = None
    rows = []
    for layer in run.layers:
        for m in metrics:
            try:
                s = run.metric(m, layer)
            except KeyError:
                continue
            s = s.dropna()
            if s.empty:
                continue
            rho = float("nan")
            if loss is not None:
                common = s.index.intersection(loss.index)
                if len(common) > 2:
                    rho = float(spearmanr(s.loc[common].to_numpy(), loss.loc[common].to_numpy()).statistic)
            rows.append(
                {
                    "layer": layer,
                    "metric": m,
                    "initial": float(s.iloc[0]),
                    "minimum": float(s.min()),
                    "step_of_min": int(s.idxmin()),
                    "final": float(s.iloc[-1]),
                    "rho_loss": rho,
                }
            )
    return pd.DataFrame(rows)



