"""Phases, the resolution analysis and live alerts, on synthetic curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dimscope.transitions import Pelt
from dimscope.transitions.alerts import Alerts
from dimscope.transitions.phases import early_share, segment_phases
from dimscope.transitions.resolution import resolution_analysis


def _collapse_expand_plateau(n=1000, noise=0.1, seed=0):
    t = np.arange(n, dtype=float)
    y = np.where(t < 0.2 * n, 10 - 6 * t / (0.2 * n), np.where(t < 0.6 * n, 4 + 5 * (t - 0.2 * n) / (0.4 * n), 9.0))
    return y + np.random.default_rng(seed).normal(0, noise, n)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_collapse_expand_plateau_gives_three_phases(seed):
    steps = 5 * np.arange(1000)
    ph = segment_phases(_collapse_expand_plateau(seed=seed), steps)
    assert [p.label for p in ph] == ["collapse", "expansion", "stabilization"]
    length = steps[-1] - steps[0]
    assert abs(ph[0].end - 1000) <= 0.05 * length  # true boundary at step 1000
    assert abs(ph[1].end - 3000) <= 0.05 * length  # true boundary at step 3000
    assert ph[0].start == 0 and ph[-1].end == steps[-1]
    assert sum(p.share_of_change for p in ph) == pytest.approx(1.0)
    # total variation: 6 down, 5 up, noise smoothed away
    assert ph[0].share_of_change == pytest.approx(6 / 11, abs=0.05)
    assert ph[0].delta == pytest.approx(-6, abs=0.3)


def test_flat_start_is_other_and_early_share():
    t = np.arange(1000, dtype=float)
    y = np.where(t < 300, 1.0, np.where(t < 400, 1.0 + (t - 300) / 100.0, 2.0))
    labels = [p.label for p in segment_phases(y, time="linear")]
    assert labels == ["other", "expansion", "stabilization"]
    share = early_share(y, fractions=(0.25, 0.5), time="linear")
    assert share[0.25] == pytest.approx(0.0, abs=0.02)
    assert share[0.5] == pytest.approx(1.0, abs=0.02)


def test_early_share_stays_within_0_and_1_when_a_phase_overshoots_before_the_cut():
    """A bump inside the flat stretch after the rise: up to the cut (step 100) the stabilization
    phase has moved by the bump, more than its own net change; it counts at most that."""
    t = np.arange(400)
    y = np.minimum(t / 40, 1.0) + 0.08 * np.exp(-((t - 100) / 20.0) ** 2)
    assert [p.label for p in segment_phases(y)] == ["expansion", "stabilization"]
    share = early_share(y, fractions=(0.1, 0.25, 1.0))
    assert 0.9 < share[0.1] <= share[0.25] <= 1.0 and share[1.0] == pytest.approx(1.0)


def test_phase_errors():
    with pytest.raises(ValueError, match="'flat' parameter of segment_phases"):
        segment_phases(np.arange(10.0), flat=-1)
    with pytest.raises(ValueError, match="'time' parameter of segment_phases"):
        segment_phases(np.arange(10.0), time="weird")


def test_resolution_short_lived_transitions_missed_by_coarse_sampling():
    rng = np.random.default_rng(0)
    steps = 5 * np.arange(1600)  # 8000 steps, measured every 5
    x = np.zeros(1600)
    x[steps >= 4000] += 3.0  # a lasting step
    x[(steps >= 2010) & (steps < 2070)] += 3.0  # a 60-step blip: between two samples of every 100
    x += rng.normal(0, 0.3, 1600)
    res = resolution_analysis(x, steps, Pelt(window=10), resolutions=(25, 100))
    assert sorted(res.table["step"]) == [2010, 2070, 4000]
    assert res.seen(25) == [2010, 2070, 4000]  # 25-step sampling still catches the blip
    assert sorted(res.missed(100)) == [2010, 2070]  # 100-step sampling never lands on it
    assert res.seen(100) == [4000]
    s = res.summary.set_index("every")
    assert s.loc[100, "missed"] == 2 and s.loc[5, "samples"] == 1600 and s.loc[100, "samples"] == 80


def test_resolution_respects_noise_floor():
    rng = np.random.default_rng(1)
    steps = 5 * np.arange(800)
    x = np.where(steps < 2000, 0.0, 1.0) + rng.normal(0, 0.05, 800)
    assert len(resolution_analysis(x, steps, Pelt(), (25,), noise_floor=0.1).table) == 1
    assert len(resolution_analysis(x, steps, Pelt(), (25,), noise_floor=1.0).table) == 0  # 1 < 3 x 1.0


def _feed(al, steps, series, loss):
    out = []
    for i, s in enumerate(steps):
        vals = {(layer, "stable_rank"): v[i] for layer, v in series.items()}
        vals[("", "loss")] = loss[i]
        out += al.observe(int(s), vals)
    return out


def test_alert_collapse_fires_once_and_rearms():
    al = Alerts(check_every=1, window=50)
    v = np.concatenate([np.linspace(2, 10, 20), np.full(10, 4.0), np.full(10, 9.0), np.full(10, 3.0)])
    out = _feed(al, 5 * np.arange(len(v)), {"fc1": v}, np.ones(len(v)))
    col = [a for a in out if a.alert == "collapse"]
    assert [a.step for a in col] == [100, 200]  # first fall below 5, then again after recovering
    assert "below 0.5 x its running max 10" in col[0].message


def test_alert_stalled_expansion_needs_falling_loss():
    n = 200
    steps = 5 * np.arange(n)
    flat = np.full(n, 3.0)
    out = _feed(Alerts(check_every=10, window=250), steps, {"fc1": flat}, np.linspace(2.0, 0.5, n))
    assert any(a.alert == "stalled_expansion" for a in out)
    out2 = _feed(Alerts(check_every=10, window=250), steps, {"fc1": flat}, np.full(n, 1.0))
    assert not any(a.alert == "stalled_expansion" for a in out2)
    grow = np.linspace(3, 9, n)
    out3 = _feed(Alerts(check_every=10, window=250), steps, {"fc1": grow}, np.linspace(2.0, 0.5, n))
    assert not any(a.alert == "stalled_expansion" for a in out3)


def test_alert_instability_and_early_saturation():
    rng = np.random.default_rng(0)
    n = 120
    v = 5 + 0.001 * rng.normal(size=n)
    v[100:] += rng.normal(0, 1.0, 20)
    out = _feed(Alerts(check_every=1, window=1000), 5 * np.arange(n), {"a": v}, np.ones(n))
    inst = [a for a in out if a.alert == "instability"]
    assert inst and 500 <= inst[0].step <= 600
    n = 200
    early = np.concatenate([np.linspace(1, 8, 50), np.full(150, 8.0)])
    late = np.full(n, 2.0)
    al = Alerts(check_every=10, window=250)
    al._layers = ["a", "b"]
    out = _feed(al, 5 * np.arange(n), {"a": early, "b": late}, np.linspace(2.0, 0.2, n))
    sat = [a for a in out if a.alert == "early_saturation"]
    assert sat and sat[0].layer == "a" and "does not expand" in sat[0].message


def test_alerts_extension_stores_events_and_calls_back_on_training_thread(tmp_path):
    import threading

    import torch

    import dimscope

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    probe = torch.randn(64, 8)
    got = []
    main = threading.get_ident()
    al = Alerts(check_every=1, collapse_fraction=0.999, callback=lambda a: got.append((a.alert, threading.get_ident())))
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0"], run=str(tmp_path / "r"), extensions=[al], weight_metrics=False) as tr:
        for step in range(6):
            with torch.no_grad():
                model[0].weight.mul_(0.2 if step == 3 else 1.0)  # squash the layer: its rank statistics move
                model[0].weight[:, :6] *= 0.1 if step == 3 else 1.0
            tr.step(step, loss=1.0)
    run = dimscope.open_run(tmp_path / "r")
    ev = run.events("alert")
    assert len(al.alerts) >= 1 and len(ev) == len(al.alerts)
    assert set(ev.iloc[0]["payload"]) == {"alert", "message"}
    assert got and all(tid == main for _, tid in got)
