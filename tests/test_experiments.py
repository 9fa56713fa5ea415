"""Intervention windows, screening, StopOnAlert, the CLI commands and the report section."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dimscope
from dimscope.experiments import (
    ClassificationData,
    StopOnAlert,
    early_scores,
    even_windows,
    intervention,
    screen,
    spearman_bootstrap,
)
from dimscope.experiments.report import report_section


def blobs(n_train: int = 240, n_test: int = 120, seed: int = 0) -> ClassificationData:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 8, generator=g) * 2.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 4
        return centers[y] + torch.randn(n, 8, generator=g), y

    Xtr, ytr = draw(n_train)
    Xte, yte = draw(n_test)
    return ClassificationData(Xtr, ytr, Xte, yte)


def small(seed: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


KW = dict(steps=80, seeds=(0, 1, 2), batch_size=32, lr=1e-2, every=10, probe_size=64)


def test_no_corruption_means_no_loss_and_identical_geometry() -> None:
    """Strength 0 changes no label, so each windowed run repeats the clean run exactly (same seed, same batches)."""
    res = intervention(small, blobs(), windows=[(0, 40), (40, 80)], strength=0.0, **KW)
    w = res.summary[res.summary["window"] != "clean"]
    assert (w["loss_mean"] == 0).all() and (w["loss_max"] == 0).all() and not w["lasting"].any()
    c = res.curves.pivot_table(index=["seed", "step", "layer"], columns="window", values="value")
    assert np.array_equal(c["clean"].to_numpy(), c["0-40"].to_numpy())
    assert sorted(res.curves["step"].unique()) == list(range(0, 80, 10))


def test_late_label_noise_is_lasting_and_early_is_not() -> None:
    data = blobs()
    res = intervention(small, data, windows=[(0, 20), (60, 80)], strength=1.0, **KW)
    s = res.summary.set_index("window")
    assert s.loc["clean", "accuracy_mean"] > 0.9
    assert s.loc["60-80", "loss_mean"] > 0.2 and bool(s.loc["60-80", "lasting"])
    assert abs(s.loc["0-20", "loss_mean"]) < 0.05 and not bool(s.loc["0-20", "lasting"])
    # the summary's spread is the spread of the paired per-seed losses
    pc = res.per_class.drop_duplicates(["window", "seed"]).set_index(["window", "seed"])["overall"]
    losses = (pc.loc["clean"] - pc.loc["60-80"]).to_numpy()
    assert math.isclose(s.loc["60-80", "loss_std"], float(np.std(losses, ddof=1)))
    assert s.loc["60-80", "loss_min"] == losses.min() and s.loc["60-80", "n_seeds"] == 3


def test_user_transform_damages_only_the_other_classes() -> None:
    def all_zero(x: torch.Tensor, y: torch.Tensor, step: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(y)

    res = intervention(small, blobs(), windows=[(60, 80)], corruption=all_zero, **KW)
    pc = res.per_class[res.per_class["window"] == "60-80"].groupby("class")["loss"].mean()
    assert pc.loc[0] <= 0.0  # every input called "0": class 0 is not lost
    assert (pc.loc[[1, 2, 3]] > 0.3).all()
    assert res.summary.set_index("window").loc["60-80", "worst_class"] in (1, 2, 3)


def test_intervention_bad_input() -> None:
    data = blobs()
    with pytest.raises(ValueError, match=r"0 <= start < end <= steps=80. Got \(50, 90\)"):
        intervention(small, data, windows=[(50, 90)], **KW)
    with pytest.raises(ValueError, match="'corruption' parameter of intervention must be one of 'label_noise', 'input_noise'. Got 'blur'"):
        intervention(small, data, windows=2, corruption="blur", **KW)
    with pytest.raises(ValueError, match="'strength' parameter of label_noise must be a float >= 0.0 and <= 1.0. Got 1.5"):
        intervention(small, data, windows=2, strength=1.5, **KW)
    assert even_windows(100, 4) == [(0, 25), (25, 50), (50, 75), (75, 100)]


def test_early_scores_use_only_the_early_window() -> None:
    hist = pd.DataFrame({
        "step": [0, 5, 10, 15], "layer": "a", "metric": "stable_rank", "value": [10.0, 5.0, 7.0, 100.0], "space": "activation",
    })
    loss = [(0, 2.0), (5, 1.0), (10, 0.5), (15, 0.01)]
    s = early_scores(hist, loss, "stable_rank", early_step=10)
    assert math.isclose(s["expansion"], math.log(7 / 5))
    assert math.isclose(s["growth"], math.log(7 / 10))
    assert math.isclose(s["loss_drop"], math.log(2.0 / 0.5))


def test_spearman_bootstrap() -> None:
    x = np.arange(8.0)
    rho, lo, hi = spearman_bootstrap(x, x**2)
    assert np.allclose((rho, lo, hi), 1.0)
    rho, lo, hi = spearman_bootstrap(x, np.array([3, 1, 4, 1, 5, 9, 2, 6.0]))
    from scipy.stats import spearmanr

    assert math.isclose(rho, spearmanr(x, [3, 1, 4, 1, 5, 9, 2, 6]).statistic) and lo < rho < hi


def test_screen_reports_rho_of_its_own_table() -> None:
    from scipy.stats import spearmanr

    def mlp(width: int):  # type: ignore[no-untyped-def]
        return lambda seed: nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

    cands = {"w1": mlp(1), "w2": mlp(2), "w8": mlp(8), "w32": mlp(32)}
    res = screen(cands, blobs(), steps=60, early_fraction=0.25, every=3, batch_size=32, lr=1e-2, probe_size=64, n_boot=200)
    t = res.table.set_index("candidate")
    assert list(t.index) == list(cands) and (t["early_step"] == 15).all()
    s = res.summary.set_index("score")
    for score in ("expansion", "growth", "loss_drop"):
        assert math.isclose(s.loc[score, "rho"], spearmanr(t[score], t["final_accuracy"]).statistic)
        assert s.loc[score, "lo"] <= s.loc[score, "rho"] <= s.loc[score, "hi"]
    assert res.rho == s.loc["expansion", "rho"] and s["primary"].sum() == 1
    assert t.loc["w32", "final_accuracy"] > t.loc["w1", "final_accuracy"]
    with pytest.raises(ValueError, match="'candidates' parameter of screen must be a mapping name → model_fn with at least 3 entries. Got 2"):
        screen({"a": mlp(1), "b": mlp(2)}, blobs())
    with pytest.raises(ValueError, match="fewer than 3 measurements"):
        screen(cands, blobs(), steps=20, early_fraction=0.1, every=5)


class RaiseAlert(dimscope.TrackerExtension):
    """Writes one alert event at a given step, as an alert extension would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_metrics(self, tracker, step, values):  # type: ignore[no-untyped-def]
        if step == self.at:
            tracker.store.add_event(step, "alert", layer="0", metric="stable_rank", payload={"alert": "collapse", "message": "rank fell"})


def test_stop_on_alert_polls_the_run_and_stops_the_loop(tmp_path) -> None:
    model = small(0)
    seen = []
    stopper = StopOnAlert(on_alert=seen.append, poll_seconds=0)
    data = blobs()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    last = None
    with dimscope.Tracker(model, probe=data.X_test, every=5, run=str(tmp_path / "r"), commit_every=1, background=False,
                          weight_metrics=False, extensions=[RaiseAlert(20), stopper]) as tr:
        for step in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.X_train), data.y_train).backward()
            opt.step()
            tr.step(step)
            last = step
            if stopper.should_stop:
                break
    # written and committed at step 20's measurement, read and handled at the start of step 21
    assert last == 21
    assert len(seen) == 1 and seen[0]["step"] == 20 and seen[0]["payload"]["alert"] == "collapse"


def test_stop_on_alert_push_filter_and_trainer() -> None:
    class Trainer:
        should_stop = False

    trainer = Trainer()
    stopper = StopOnAlert(alerts=["collapse"], stop_after=2, trainer=trainer, poll=False)
    stopper.setup(dimscope.Tracker(small(0), probe=torch.randn(8, 8), background=False))
    stopper._tracker = None  # handle synchronously
    stopper.notify({"step": 1, "payload": {"alert": "instability"}})
    stopper.notify({"step": 2, "payload": {"alert": "collapse"}})
    assert not stopper.should_stop and not trainer.should_stop
    stopper.notify({"step": 3, "payload": {"alert": "collapse"}})
    assert stopper.should_stop and trainer.should_stop and [e["step"] for e in stopper.seen] == [2, 3]


def test_cli_rejects_bad_seeds() -> None:
    from dimscope.cli import main

    assert main(["intervene", "--seeds", "0", "--quick", "--out", "/nonexistent/x"]) == 2


def test_report_sections(tmp_path) -> None:
    data = blobs()
    res = intervention(small, data, windows=[(60, 80)], **KW)
    res.save(tmp_path / "iv")
    sec = report_section(dimscope.open_run(tmp_path / "iv"))
    assert [s.title for s in sec] == ["Intervention windows"]
    assert "{{fig:intervention}}" in sec[0].html and "intervention" in sec[0].figures
    assert f"{res.summary['loss_mean'].iloc[1]:.4g}" in sec[0].html
    from dimscope.store import RunStore

    with RunStore(tmp_path / "empty"):
        pass
    assert report_section(dimscope.open_run(tmp_path / "empty")) is None


@pytest.mark.slow
def test_recipes_quick_from_the_cli(tmp_path, capsys) -> None:
    from dimscope.cli import main

    assert main(["intervene", "--quick", "--out", str(tmp_path / "iv")]) == 0
    s = dimscope.open_run(tmp_path / "iv").artifact("experiments/intervention")
    assert (s["window"] != "clean").sum() >= 4 and (s["n_seeds"] == 3).all()
    assert main(["screen", "--quick", "--out", str(tmp_path / "sc")]) == 0
    info = dimscope.open_run(tmp_path / "sc").artifact("experiments/screening_summary")
    assert all(r["n"] >= 6 for r in info["scores"])
    assert main(["formation", "--quick", "--run", str(tmp_path / "fm")]) == 0
    run = dimscope.open_run(tmp_path / "fm")
    first = run.artifact("experiments/formation_first")
    assert set(first["class"]) == set(range(10))
    secs = report_section(run)
    assert secs[0].title == "Feature formation map"


def test_readme_monitoring_example_stops_on_rank_floor(tmp_path) -> None:
    """The README's custom alert source + StopOnAlert: an impossible floor alerts at the first measurement."""

    class RankFloor(dimscope.TrackerExtension):
        def __init__(self, layer, floor):  # type: ignore[no-untyped-def]
            self.layer, self.floor = layer, floor

        def on_metrics(self, tracker, step, values):  # type: ignore[no-untyped-def]
            v = values.get((self.layer, "stable_rank"))
            if v is not None and v < self.floor:
                tracker.store.add_event(step, "alert", layer=self.layer, metric="stable_rank",
                                        payload={"alert": "rank_floor", "message": f"stable rank {v:.2f} < {self.floor}"})

    model = small(0)
    stopper = StopOnAlert(alerts=["rank_floor"], poll_seconds=0)
    data = blobs()
    steps_run = 0
    with dimscope.Tracker(model, probe=data.X_test, every=5, run=str(tmp_path / "r"), commit_every=1, background=False,
                          extensions=[RankFloor("0", 1e9), stopper]) as tr:
        for step in range(50):
            tr.step(step, loss=1.0)
            steps_run += 1
            if stopper.should_stop:
                break
    assert steps_run == 2  # alert at step 0's measurement, stop at step 1
    ev = dimscope.open_run(tmp_path / "r").events("alert")
    assert len(ev) == 1 and ev["payload"].iloc[0]["alert"] == "rank_floor"
