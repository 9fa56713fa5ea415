"""Recipes: each experiment template on ``load_digits``, under 10 minutes on 2 CPU cores, with a quick variant.

* :func:`intervention_recipe` — MLP 64-128-128-10, Adam, full label noise during one window at a time.
* :func:`screening_recipe` — eight candidate architectures (MLPs of several widths / depths /
  activations, a CNN, a residual MLP), scored on their first 10 % of steps.
* :func:`formation_recipe` — the feature formation map of an MLP (see :mod:`.formation`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tracker import Tracker
from ._training import build_model, digits_data, train_classifier
from .formation import FormationMap
from .intervention import InterventionResult, intervention
from .screening import ScreenResult, screen

__all__ = ["intervention_recipe", "screening_recipe", "formation_recipe", "digits_mlp", "screening_candidates"]


def digits_mlp(seed: int = 0, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


def _mlp(widths: list[int], act: type[nn.Module]) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        mods: list[nn.Module] = []
        d = 64
        for w in widths:
            mods += [nn.Linear(d, w), act()]
            d = w
        mods.append(nn.Linear(d, 10))
        return nn.Sequential(*mods)

    return make


def _cnn(seed: int) -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10),
    )


def _resmlp(seed: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), _Residual(nn.Sequential(nn.ReLU(), nn.Linear(64, 64))), _Residual(nn.Sequential(nn.ReLU(), nn.Linear(64, 64))),
        nn.ReLU(), nn.Linear(64, 10),
    )


def screening_candidates() -> dict[str, Callable[[int], nn.Module]]:
    """Eight candidates of different kinds and capacities (the first six are the quick set)."""
    return {
        "mlp-4": _mlp([4], nn.ReLU),
        "mlp-16": _mlp([16], nn.ReLU),
        "mlp-128x2": _mlp([128, 128], nn.ReLU),
        "tanh-64x2": _mlp([64, 64], nn.Tanh),
        "sigmoid-32x4": _mlp([32, 32, 32, 32], nn.Sigmoid),
        "cnn-8-16": _cnn,
        "resmlp-64": _resmlp,
        "mlp-256x3": _mlp([256, 256, 256], nn.ReLU),
    }


def intervention_recipe(
    out: str | Path | None = "runs/intervention", *, quick: bool = False, corruption: str = "label_noise", strength: float = 1.0,
    seeds: tuple[int, ...] = (0, 1, 2), progress: Callable[[str], None] | None = None,
) -> InterventionResult:
    """Label noise in one window at a time; four windows in the first 2/3 of training, then recovery.

    Full: 1500 steps (Adam 1e-3, batch 64), windows of 250 steps at 0, 250, 500, 750 and a last one at
    1250-1500 that leaves no time to recover (a control for "damage at the end is not lasting damage");
    quick: 300 steps, windows of 50.
    """
    data = digits_data()
    if quick:
        steps, windows, every = 300, [(0, 50), (50, 100), (100, 150), (150, 200)], 25
    else:
        steps, windows, every = 1500, [(0, 250), (250, 500), (500, 750), (750, 1000), (1250, 1500)], 25
    res = intervention(
        lambda s: digits_mlp(s), data, windows=windows, corruption=corruption, strength=strength, steps=steps, seeds=seeds,
        every=every, progress=progress,
    )
    res.config["recipe"] = "intervention-quick" if quick else "intervention"
    if out is not None:
        res.save(out)
    return res


def screening_recipe(
    out: str | Path | None = "runs/screening", *, quick: bool = False, early_fraction: float = 0.1, progress: Callable[[str], None] | None = None,
) -> ScreenResult:
    """Eight candidates × 1500 steps (quick: six × 300), scored on the first 10 %; ρ with a 95 % bootstrap interval."""
    data = digits_data()
    cands = screening_candidates()
    if quick:
        cands = dict(list(cands.items())[:6])
        steps, every = 300, 3
    else:
        steps, every = 1500, 5
    res = screen(cands, data, steps=steps, early_fraction=early_fraction, every=every, progress=progress)
    res.config["recipe"] = "screening-quick" if quick else "screening"
    if out is not None:
        res.save(out)
    return res


def formation_recipe(
    run: str | Path = "runs/formation", *, quick: bool = False, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """An MLP on ``load_digits`` with a Tracker and a :class:`FormationMap` (ridge probe every 10 steps).

    Full: 1500 steps, probe 497 held-out digits; quick: 200 steps. Returns the run path, the test accuracy
    and the first-decodable table.
    """
    data = digits_data()
    steps = 200 if quick else 1500
    model = build_model(lambda s: digits_mlp(s, width=64), 0)
    probe, labels = data.X_test, data.y_test
    fmap = FormationMap(labels, every=10)
    with Tracker(model, probe=probe, every=10, layers="auto", run=str(run), overwrite=True, extensions=[fmap],
                 config={"recipe": "formation-quick" if quick else "formation", "steps": steps}) as tracker:
        train_classifier(model, data, steps=steps, seed=0, lr=3e-4, tracker=tracker)
    model.eval()
    with torch.no_grad():
        acc = float((model(data.X_test).argmax(-1) == data.y_test).float().mean())
    return {"run": str(run), "test_accuracy": acc, "first": fmap.first_decodable()}


