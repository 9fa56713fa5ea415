"""Correlations, noise floors and analyze_run on runs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import dimscope
from dimscope.analysis import analyze_run, correlate, lead_lag, spearman_interval
from dimscope.cli import main
from dimscope.store import RunStore
from dimscope.transitions.detectors import robust_sigma
from dimscope.transitions.noise import REPLICATES_ARTIFACT, NoiseFloor, noise_floor


def test_spearman_of_a_monotone_decreasing_function_is_minus_one():
    x = np.linspace(0.1, 5, 400) + 0.01 * np.random.default_rng(0).normal(size=400)
    x = np.sort(x)
    rho, lo, hi = spearman_interval(x, np.exp(-x))
    assert rho == pytest.approx(-1.0) and lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)


def test_spearman_interval_covers_zero_for_independent_series_and_known_rho():
    rng = np.random.default_rng(1)
    rho, lo, hi = spearman_interval(rng.normal(size=500), rng.normal(size=500))
    assert lo < 0 < hi and hi - lo < 0.4
    # bivariate normal with r = 0.8: Spearman rho = (6/pi) asin(r/2) = 0.786
    z = rng.multivariate_normal([0, 0], [[1, 0.8], [0.8, 1]], size=2000)
    rho, lo, hi = spearman_interval(z[:, 0], z[:, 1])
    assert rho == pytest.approx(6 / np.pi * np.arcsin(0.4), abs=0.03) and lo < 0.786 < hi


def test_block_bootstrap_is_wider_than_iid_for_a_random_walk():
    rng = np.random.default_rng(2)
    a, b = np.cumsum(rng.normal(size=800)), np.cumsum(rng.normal(size=800))
    _, lo1, hi1 = spearman_interval(a, b, block=1)
    _, lo2, hi2 = spearman_interval(a, b, block=50)
    assert hi2 - lo2 > 2 * (hi1 - lo1)


def test_lead_lag_recovers_a_known_shift():
    rng = np.random.default_rng(3)
    z = np.cumsum(rng.normal(size=1010))
    steps = 5 * np.arange(1000)
    metric = pd.Series(z[10:], index=steps)  # the metric moves 10 samples before the loss
    loss = pd.Series(-z[:1000] + rng.normal(0, 0.1, 1000), index=steps)
    res = correlate(metric, loss)
    assert res["best_lag"] == 50 and res["leads"] == "metric" and res["rho"] < -0.5
    lag, c, leads = lead_lag(loss.values, metric.values, steps)
    assert lag == -50 and leads == "target"
    lag, c, leads = lead_lag(rng.normal(size=500), rng.normal(size=500))
    assert leads == "neither"


def _tiny_tracker_run(tmp_path, n_probe, every_boot=2, name="r"):
    """The model never trains, so every measurement sees the same features."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    probe = torch.randn(n_probe, 16)
    nf = NoiseFloor(every=every_boot, n_boot=40)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0", "2"], run=str(tmp_path / name), extensions=[nf],
                          metrics=["stable_rank", "participation_ratio"], background=False, weight_metrics=False) as tr:
        for step in range(5):
            tr.step(step, loss=1.0 / (step + 1))
    return dimscope.open_run(tmp_path / name), (model, probe)


def test_noise_floor_bootstrap_scales_like_one_over_sqrt_n(tmp_path):
    small, (model, probe) = _tiny_tracker_run(tmp_path, 128, name="small")
    big, _ = _tiny_tracker_run(tmp_path, 2048, name="big")
    reps = small.artifact(REPLICATES_ARTIFACT)
    assert sorted(reps["step"].unique()) == [0, 2, 4]  # every=2
    assert len(reps) == 3 * 2 * 2 * 40  # steps x layers x metrics x n_boot
    a = noise_floor(small).set_index(["layer", "metric"])
    b = noise_floor(big).set_index(["layer", "metric"])
    assert (a["source"] == "bootstrap").all() and (a["n_steps"] == 3).all()
    ratio = a.loc[("0", "stable_rank"), "noise_floor"] / b.loc[("0", "stable_rank"), "noise_floor"]
    assert ratio > 2.0  # 16x the probe: a much lower floor (sqrt(16) = 4 asymptotically)
    # the replicates are bootstrap resamples of the probe rows: recompute step 0 of layer "0"
    X = model[0](probe).detach()
    rng = np.random.default_rng([0, 0])
    mine = []
    for _ in range(40):
        idx = rng.integers(0, 128, 128)
        mine.append(dimscope.stable_rank(dimscope.spectrum(X[idx])))
    got = reps[(reps.step == 0) & (reps.layer.astype(str) == "0") & (reps.metric == "stable_rank")].sort_values("replicate")["value"]
    np.testing.assert_allclose(got.to_numpy(), mine, rtol=1e-9)
    # the floor is the median over steps of the bootstrap standard deviation
    g = reps[(reps.layer.astype(str) == "0") & (reps.metric == "stable_rank")].groupby("step")["value"].std(ddof=1)
    assert a.loc[("0", "stable_rank"), "noise_floor"] == pytest.approx(float(np.median(g)))


def test_noise_floor_replicates_survive_an_appending_session(tmp_path):
    run, (model, probe) = _tiny_tracker_run(tmp_path, 64)
    first = run.artifact(REPLICATES_ARTIFACT)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0", "2"], run=str(tmp_path / "r"), extensions=[NoiseFloor(every=2, n_boot=40)],
                          metrics=["stable_rank", "participation_ratio"], background=False, weight_metrics=False) as tr:
        for step in range(4, 7):  # step 4 again, then 5 and 6
            tr.step(step, loss=0.1)
    reps = dimscope.open_run(tmp_path / "r").artifact(REPLICATES_ARTIFACT)
    assert sorted(reps["step"].unique()) == [0, 2, 4, 6] and len(reps) == 4 * 2 * 2 * 40  # step 4 once: the latest
    before = first[first.step < 4].sort_values(["step", "layer", "metric", "replicate"]).reset_index(drop=True)
    after = reps[reps.step < 4].sort_values(["step", "layer", "metric", "replicate"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after, check_dtype=False)


def test_noise_floor_needs_probe_mode_first():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="NoiseFloor needs probe mode"):
        dimscope.Tracker(model, mode="batch", extensions=[NoiseFloor()], background=False)


def _synthetic_run(path, floor_sd=None):
    """Two layers, two conventions; layer 'a' has a planted step of +1.0 at step 2500 under
    probe/centered only, layer 'b' is smooth. Loss falls as the metric rises."""
    rng = np.random.default_rng(0)
    steps = 5 * np.arange(1000)
    rows = []
    base = 2 + np.log1p(steps / 500.0)
    series = {
        ("a", "probe/centered"): base + np.where(steps >= 2500, 1.0, 0.0) + rng.normal(0, 0.02, 1000),
        ("a", "probe/uncentered"): 1.2 + 0.1 * np.log1p(steps / 500.0) + rng.normal(0, 0.02, 1000),
        ("b", "probe/centered"): base + rng.normal(0, 0.02, 1000),
        ("b", "probe/uncentered"): 5 - 0.2 * np.log1p(steps / 500.0) + rng.normal(0, 0.02, 1000),
    }
    loss = 2.0 / (1 + steps / 300.0) + rng.normal(0, 0.005, 1000)
    with RunStore(path, overwrite=True) as w:
        w.set_manifest({"layers": ["a", "b"], "default_convention": "probe/centered"})
        for (layer, conv), v in series.items():
            rows += [(int(s), 0.0, layer, "stable_rank", float(x), "activation", conv) for s, x in zip(steps, v)]
        rows += [(int(s), 0.0, "", "loss", float(x), "training", "") for s, x in zip(steps, loss)]
        w.add_scalars(rows)
        if floor_sd is not None:
            reps = []
            for layer in ("a", "b"):
                for conv in ("probe/centered", "probe/uncentered"):
                    for st in (0, 2500):
                        vals = rng.normal(3, floor_sd, 30)
                        reps += [(st, layer, "stable_rank", conv, i, float(v)) for i, v in enumerate(vals)]
            w.put_artifact(REPLICATES_ARTIFACT, pd.DataFrame(reps, columns=["step", "layer", "metric", "convention", "replicate", "value"]))
    return steps, series


def test_analyze_run_stores_contract_events_and_flags_significance(tmp_path):
    path = tmp_path / "syn"
    _synthetic_run(path, floor_sd=0.05)
    a = analyze_run(path, metrics=("stable_rank",), validity_replicates=2, resolutions=(25, 100))
    assert a.primary == "probe/centered" and a.conventions == ["probe/centered", "probe/uncentered"]
    t = a.transitions
    ta = t[(t.convention == "probe/centered") & (t.layer == "a") & t.significant]
    assert list(ta.step) == [2500] and ta.iloc[0]["direction"] == "up"
    assert ta.iloc[0]["size"] == pytest.approx(1.0, abs=0.1)
    assert ta.iloc[0]["noise_floor"] == pytest.approx(0.05, rel=0.35)
    assert not t[(t.layer == "b") & (t.convention == "probe/centered")]["significant"].any()
    run = dimscope.open_run(path)
    ev = run.events("transition")
    assert {"detector", "size", "noise_floor", "significant", "direction"} <= set(ev.iloc[0]["payload"])
    ph = run.events("phase")
    assert {"label", "start", "end", "share_of_change"} <= set(ph.iloc[0]["payload"])
    assert set(run.artifact("analysis/correlations").columns) >= {"layer", "metric", "target", "rho", "lo", "hi", "best_lag", "leads"}
    assert set(run.artifact("analysis/noise_floor").columns) >= {"layer", "metric", "noise_floor"}
    v = run.artifact("transitions/validity")
    assert v["verdict"] == a.validity.verdict and v["detector"].startswith("Pelt(")
    # rho with the loss: negative under probe/centered for both layers; the uncentered curve of 'b'
    # falls with the loss, so that conclusion flips sign and the table says it does not hold
    s = a.sensitivity
    rows = s[(s.layer == "b") & (s.conclusion.str.startswith("rho"))]
    assert rows.iloc[0]["holds"] == "no"
    assert rows.iloc[0]["probe/centered"].startswith("-") and rows.iloc[0]["probe/uncentered"].startswith("+")
    cnt = s[(s.layer == "a") & (s.conclusion == "significant transitions")].iloc[0]
    assert cnt["probe/centered"] == "1" and cnt["probe/uncentered"] == "0"
    # running it again replaces, never duplicates
    analyze_run(path, metrics=("stable_rank",), validity_replicates=1, resolutions=())
    assert len(dimscope.open_run(path).events("transition")) == len(ev)


def test_a_larger_noise_floor_makes_the_step_not_significant(tmp_path):
    path = tmp_path / "syn2"
    _synthetic_run(path, floor_sd=0.5)  # 1.0 < 3 x 0.5
    a = analyze_run(path, metrics=("stable_rank",), validity_replicates=1, resolutions=(), store=False)
    t = a.transitions
    hit = t[(t.convention == "probe/centered") & (t.layer == "a") & (t.step == 2500)]
    assert len(hit) == 1 and not bool(hit.iloc[0]["significant"])


def test_noise_floor_falls_back_to_series_jitter(tmp_path):
    path = tmp_path / "syn3"
    steps, series = _synthetic_run(path)
    nf = noise_floor(path).set_index(["layer", "metric", "convention"])
    row = nf.loc[("b", "stable_rank", "probe/centered")]
    assert row["source"] == "series"
    assert row["noise_floor"] == pytest.approx(robust_sigma(series[("b", "probe/centered")]))
    assert row["noise_floor"] == pytest.approx(0.02, rel=0.2)


def test_cli_analyze_and_validate_detector(tmp_path, capsys):
    path = tmp_path / "syn4"
    _synthetic_run(path, floor_sd=0.05)
    assert main(["analyze", str(path), "--validity-replicates", "1"]) == 0
    out = capsys.readouterr().out
    assert "convention sensitivity" in out and "phases" in out and "noise floor" in out
    assert len(dimscope.open_run(path).events("phase")) > 0
    assert main(["validate-detector", "--detector", "zscore", "--replicates", "2", "--run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: VALID" in out and "white_noise" in out
    assert dimscope.open_run(path).artifact("transitions/validity")["detector"].startswith("ZScore(")
    assert main(["analyze", str(path), "--convention", "batch/centered"]) == 2
    assert "not recorded in this run" in " ".join(capsys.readouterr().err.split())
    assert main(["validate-detector", "--param", "bogus"]) == 2


def test_report_sections_render_the_analysis(tmp_path):
    from dimscope.report.core import transitions_section, validity_section
    from dimscope.transitions.report import report_section

    path = tmp_path / "syn5"
    _synthetic_run(path, floor_sd=0.05)
    assert report_section(dimscope.open_run(path)) is None  # nothing analysed yet
    analyze_run(path, metrics=("stable_rank",), validity_replicates=1, resolutions=())
    run = dimscope.open_run(path)
    sec = report_section(run)
    assert "Convention sensitivity" in sec.html
    assert "probe/centered" in sec.html and "probe/uncentered" in sec.html  # counts per convention
    val = validity_section(run)  # the validity panel lives in the core report
    assert "ar1" in val.html and "validity" in val.figures
    tr = transitions_section(run)
    events_part = tr.html.split("<h3>Noise floors")[0]  # noise floors are listed for every convention
    assert "Transitions (probe/centered)" in events_part and "probe/uncentered" not in events_part


def test_transition_counts_list_every_series_with_zeros(tmp_path):
    path = tmp_path / "syn6"
    _synthetic_run(path, floor_sd=0.05)
    a = analyze_run(path, metrics=("stable_rank",), validity_replicates=1, resolutions=(), store=False)
    c = a.transition_counts().set_index(["convention", "layer"])
    assert len(c) == 4
    assert c.loc[("probe/centered", "a"), "significant"] == 1
    assert c.loc[("probe/uncentered", "a"), "significant"] == 0


def test_series_jitter_of_an_integer_metric_is_not_zero():
    from dimscope.transitions.noise import series_jitter

    v = np.full(400, 7.0)
    v[100:] += 1
    v[250:] -= 1  # a few unit moves, most increments exactly 0: MAD = 0
    assert robust_sigma(v) == 0.0
    assert series_jitter(v) == pytest.approx(np.std(np.diff(v), ddof=1) / np.sqrt(2))
    assert series_jitter(v) > 0


def test_analyze_a_run_with_a_frozen_layer_and_a_run_with_one_measurement(tmp_path, capsys):
    """A frozen tracked layer gives a constant series (ρ undefined); a single measurement gives
    series of length 1: analyze reports them, it does not fail."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    with dimscope.Tracker(model, probe=torch.randn(32, 10, generator=g), every=2, layers=["0", "2"], run=tmp_path / "frozen",
                          metrics=["stable_rank"]) as tr:
        for s in range(60):
            x = torch.randn(32, 10, generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            loss.backward()
            opt.step()
            tr.step(s, loss=loss.item())
    assert main(["analyze", str(tmp_path / "frozen")]) == 0
    sens = dimscope.open_run(tmp_path / "frozen").artifact("analysis/convention_sensitivity")
    rho0 = sens[(sens.layer == "0") & sens.conclusion.str.startswith("rho")]
    assert list(rho0["holds"]) == ["no"] and "nan" in rho0["probe/centered"].iloc[0]
    with dimscope.Tracker(model, probe=torch.randn(32, 10, generator=g), every=100, layers=["0"], run=tmp_path / "one") as tr:
        for s in range(3):
            tr.step(s, loss=1.0)
    assert main(["analyze", str(tmp_path / "one")]) == 0


def test_analysing_one_convention_stores_that_analysis_whole_and_a_bad_metric_changes_nothing(tmp_path):
    path = tmp_path / "two"
    _synthetic_run(path, floor_sd=0.05)
    analyze_run(path, validity_replicates=1)

    def by_conv(kind):
        ev = dimscope.open_run(path).events(kind)
        return ev.payload.map(lambda p: json.loads(p)["convention"] if isinstance(p, str) else p["convention"]).value_counts().to_dict()

    before = by_conv("phase")
    assert set(before) == {"probe/centered", "probe/uncentered"}
    with pytest.raises(ValueError, match="The 'metrics' parameter of analyze_run names 'nosuch', which this run does not record. Recorded: stable_rank"):
        analyze_run(path, metrics=["nosuch"], validity_replicates=1)
    with pytest.raises(ValueError, match="The 'conventions' parameter of analyze_run must name at least one convention"):
        analyze_run(path, conventions=[], validity_replicates=1)
    assert by_conv("phase") == before  # a rejected analysis changes nothing
    a = analyze_run(path, conventions=["probe/uncentered"], validity_replicates=1)
    assert a.primary == "probe/uncentered" and a.conventions == ["probe/uncentered"]  # the primary is one analysed
    assert len(a.phases[a.phases.convention == a.primary]) > 0
    # the stored analysis is this one, whole: its events, noise floor and summary agree
    assert set(by_conv("phase")) == {"probe/uncentered"}
    run = dimscope.open_run(path)
    assert run.artifact("analysis/summary")["conventions"] == ["probe/uncentered"]
    assert len(run.artifact("analysis/resolution")) > 0
    analyze_run(path, resolutions=(), validity_replicates=1)  # no resolution table: none stored either
    assert len(dimscope.open_run(path).artifact("analysis/resolution")) == 0
