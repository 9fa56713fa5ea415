"""The feature formation map on a synthetic task where one class becomes decodable at a known step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dimscope
from dimscope.experiments import FormationMap, first_decodable, ridge_decodability

T_SWITCH = 60  # the step at which class 3's only informative features are let through


def synthetic(n_per: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes in 8 dims. Classes 0-2: mean 3·e_c in dims 0-2. Class 3: in dims 0-2 a copy of a random
    other class's distribution (indistinguishable there), and mean 3 in dim 6 — its only signature."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n_per, 8, generator=g) * 0.5
    y = torch.arange(4).repeat_interleave(n_per)
    for c in range(3):
        X[y == c, c] += 3.0
    mimic = torch.randint(0, 3, (n_per,), generator=g)
    X[y == 3, mimic] += 3.0
    X[y == 3, 6] += 3.0
    return X, y


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask)


def test_class_becomes_decodable_at_the_known_step(tmp_path) -> None:
    torch.manual_seed(0)
    X, y = synthetic()
    model = Gated()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    fmap = FormationMap(y, every=10, threshold=0.9, patience=2)
    with dimscope.Tracker(model, probe=X, every=10, run=str(tmp_path / "run"), extensions=[fmap], weight_metrics=False, metrics=["stable_rank"]) as tr:
        for step in range(121):
            if step == T_SWITCH:
                model.mask[6:] = 1.0
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
            tr.step(step)
    run = dimscope.open_run(tmp_path / "run")
    table = run.artifact("experiments/formation")
    first = run.artifact("experiments/formation_first")
    assert set(table["layer"]) == {"net.0", "net.2", "net.4"}
    assert sorted(table["step"].unique()) == list(range(0, 121, 10))
    for layer in ("net.0", "net.2", "net.4"):
        f = first[first["layer"] == layer].set_index("class")["first_step"]
        assert (f.loc[[0, 1, 2]] == 0).all(), f  # visible classes: decodable from the start
        assert f.loc[3] == T_SWITCH, f  # class 3: at the first measurement after the switch
        before = table[(table["layer"] == layer) & (table["class"] == 3) & (table["step"] < T_SWITCH)]["auc"]
        after = table[(table["layer"] == layer) & (table["class"] == 3) & (table["step"] >= T_SWITCH)]["auc"]
        assert before.max() < 0.8 and after.min() > 0.93
    # the extension's in-memory view agrees with the store
    import pandas as pd

    pd.testing.assert_frame_equal(fmap.first_decodable(), first, check_dtype=False)


def test_ridge_decodability_limits() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 50)
    X_sep = np.eye(3)[y] * 5 + rng.normal(size=(150, 3)) * 0.1
    assert np.allclose(ridge_decodability(X_sep, y, 3), 1.0)
    X_noise = rng.normal(size=(150, 5))
    auc = ridge_decodability(X_noise, y, 3)
    assert np.all(np.abs(auc - 0.5) < 0.15), auc  # chance, within sampling error for 150 samples
    # an absent class is NaN
    assert np.isnan(ridge_decodability(X_sep, y, 4)[3])


def test_first_decodable_patience() -> None:
    import pandas as pd

    t = pd.DataFrame({"step": [0, 10, 20, 30, 40], "layer": "a", "class": 0, "auc": [0.99, 0.5, 0.99, 0.99, 0.99]})
    assert first_decodable(t, 0.95, patience=1)["first_step"].iloc[0] == 0
    assert first_decodable(t, 0.95, patience=2)["first_step"].iloc[0] == 20
    assert np.isnan(first_decodable(t, 0.999, patience=1)["first_step"].iloc[0])


def test_formation_on_token_outputs_pools_per_input() -> None:
    """(B, T, D) block outputs: one mean-pooled row per probe input, so labels line up."""
    from test_architectures import HandTransformer

    torch.manual_seed(0)
    model = HandTransformer()
    tok = torch.randint(0, 20, (40, 6))
    labels = (tok[:, 0] % 2).long()  # decodable from the token embedding at position 0
    fmap = FormationMap(labels, threshold=0.8, patience=1)
    with dimscope.Tracker(model, probe=tok, every=1, background=False, weight_metrics=False, extensions=[fmap]) as tr:
        tr.step(0)
    t = fmap.table()
    assert set(t["layer"]) == {"blocks.0", "blocks.1"} and len(t) == 4
    assert t["auc"].between(0, 1).all()


def test_formation_bad_parameters() -> None:
    X, y = synthetic(10)
    model = Gated()
    with pytest.raises(ValueError, match="one label per probe input \\(40\\). Got 39"):
        dimscope.Tracker(model, probe=X, every=5, background=False, extensions=[FormationMap(y[:-1])])
    with pytest.raises(ValueError, match="multiple of the Tracker's every=5. Got 7"):
        dimscope.Tracker(model, probe=X, every=5, background=False, extensions=[FormationMap(y, every=7)])
    with pytest.raises(ValueError, match="'threshold' parameter of FormationMap must be a float >= 0.0 and <= 1.0. Got 2"):
        dimscope.Tracker(model, probe=X, every=5, background=False, extensions=[FormationMap(y, threshold=2)])


def test_closed_form_ridge_matches_sklearn() -> None:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    for n, d in ((120, 10), (60, 90)):  # primal and dual forms
        y = np.arange(n) % 3
        X = rng.normal(size=(n, d))
        X[:, 0] += y == 1
        ours = ridge_decodability(X, y, 3, alpha=2.0)
        cv = list(StratifiedKFold(2, shuffle=True, random_state=0).split(X, y))
        sc = cross_val_predict(make_pipeline(StandardScaler(), Ridge(alpha=2.0)), X, np.eye(3)[y], cv=cv)
        ref = np.array([roc_auc_score(y == c, sc[:, c]) for c in range(3)])
        assert np.allclose(ours, ref, atol=1e-9)
