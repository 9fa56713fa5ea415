"""Detectors and the validity harness: known change points, measured false-positive rates."""

from __future__ import annotations

import numpy as np
import pytest
import ruptures as rpt

from dimscope.transitions import Cusum, Fixture, Pelt, ZScore, ndtracker_battery, standard_battery, validate
from dimscope.transitions.detectors import jump_scores, make_detector, pelt_l2
from dimscope.transitions.validity import match


@pytest.fixture(scope="module")
def battery():
    return standard_battery(replicates=10)


def _by_name(rep):
    return {r.name: r for r in rep.results}


def test_zscore_defaults_valid_on_the_battery(battery):
    rep = validate(ZScore(), battery)
    res = _by_name(rep)
    assert rep.verdict == "VALID"
    assert rep.mean_recall >= 0.75
    for name in ("white_noise", "linear_drift", "ar1", "saturating"):
        assert res[name].fp_per_1000 <= 2.0, (name, res[name].fp_per_1000)
    # ndtracker's own positives are found every time
    assert res["planted_step"].recall == 1.0 and res["three_steps"].recall == 1.0
    text = rep.render()
    assert "VERDICT: VALID" in text and f"{rep.mean_recall:.3f}" in text and "ar1" in text


def test_pelt_defaults_valid_on_the_battery(battery):
    rep = validate(Pelt(), battery)
    res = _by_name(rep)
    assert rep.verdict == "VALID", rep.render()
    assert rep.mean_recall >= 0.75
    assert rep.worst_null_fp_per_1000 <= 2.0
    assert res["small_step_3sigma"].recall >= 0.9
    d = rep.to_dict()
    assert d["verdict"] == "VALID" and {f["kind"] for f in d["fixtures"]} == {"positive", "null"}
    assert all(f["recall"] is None for f in d["fixtures"] if f["kind"] == "null")


def test_seed_zscore_without_refractory_is_not_valid():
    # the seed's rolling z-score (trailing window 50, z > 3, every exceedance reported)
    rep = validate(ZScore(method="point", refractory=0), ndtracker_battery(replicates=10))
    res = _by_name(rep)
    assert rep.verdict == "NOT VALID"
    assert res["white_noise"].fp_per_1000 > 2.0
    assert res["linear_drift"].fp_per_1000 > 2.0
    assert "over the bar" in rep.render()


def test_raw_pelt_cuts_autocorrelated_noise_and_drift(battery):
    rep = validate(Pelt(confirm_z=None), [f for f in battery if f.name in ("ar1", "linear_drift", "planted_step")])
    res = _by_name(rep)
    assert rep.verdict == "NOT VALID"
    assert res["ar1"].fp_per_1000 > 20 and res["linear_drift"].fp_per_1000 > 5


def test_pelt_recovers_piecewise_constant_change_points_f1():
    tp = fp = fn = 0
    for seed in range(10):
        signal, bkps = rpt.pw_constant(1000, 1, 5, noise_std=1.0, delta=(3, 8), seed=seed)
        found = Pelt().fit(signal[:, 0]).predict()
        a, b, c = match(found, bkps[:-1], 5)
        tp, fp, fn = tp + a, fp + b, fn + c
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.9, (tp, fp, fn)


@pytest.mark.parametrize("seed,pen,ms", [(0, 1.0, 2), (1, 5.0, 5), (2, 20.0, 3), (3, 3.0, 1)])
def test_pelt_l2_matches_ruptures(seed, pen, ms):
    rng = np.random.default_rng(seed)
    x = np.repeat(rng.normal(0, 3, 6), 25) + rng.normal(size=150)
    ref = rpt.Pelt(model="l2", min_size=ms, jump=1).fit(x).predict(pen=pen)[:-1]
    assert pelt_l2(x, pen, ms) == ref


def test_predict_returns_training_steps_not_indices():
    rng = np.random.default_rng(0)
    x = np.where(np.arange(400) < 200, 10.0, 20.0) + rng.normal(0, 0.3, 400)
    steps = 5 * np.arange(400) + 100
    for det in (ZScore(), Pelt()):
        assert det.fit(x, steps).predict() == [1100], det
        assert det.fit(x).predict() == [200]
    found = Cusum().fit(x, steps).predict()
    assert any(abs(f - 1100) <= 5 for f in found) and all((f - 100) % 5 == 0 for f in found)


def test_refractory_turns_one_step_into_one_detection():
    rng = np.random.default_rng(1)
    x = np.where(np.arange(400) < 200, 10.0, 20.0) + rng.normal(0, 0.3, 400)
    seed_like = ZScore(method="point", refractory=0).fit(x).predict()
    near = [s for s in seed_like if 200 <= s < 260]
    assert len(near) >= 3  # the seed's detector fires again and again after one step
    assert [s for s in ZScore(method="point").fit(x).predict() if 150 <= s < 260] == [200]


def test_float_roundoff_never_scores():
    # ndtracker reported "jumps" of 1e-9 ... 1e-13: pure round-off must give nothing
    rng = np.random.default_rng(2)
    x = 3.0 + 1e-13 * rng.normal(size=500)
    x[250:] += 5e-13
    assert ZScore().fit(x).predict() == []
    assert Pelt().fit(x).predict() == []


def test_jump_scores_size_and_drift_invariance():
    t = np.arange(600, dtype=float)
    x = 0.05 * t + np.where(t < 300, 0.0, 2.0)
    jump, z, _ = jump_scores(x + np.random.default_rng(3).normal(0, 0.1, 600), 50)
    assert abs(jump[300] - 2.0) < 0.15  # the size is the step, the drift cancels
    assert int(np.nanargmax(np.abs(z))) in range(298, 303)


def test_cusum_online_update_matches_fit_and_signals_once():
    rng = np.random.default_rng(4)
    x = np.where(np.arange(500) < 250, 0.0, 3.0) + rng.normal(0, 1.0, 500)
    c = Cusum()
    flags = [c.update(v, 10 * i) for i, v in enumerate(x)]
    assert sum(flags) == 1
    assert abs(c.predict()[0] - 2500) <= 50
    assert Cusum().fit(x, 10 * np.arange(500)).predict() == c.predict()


def test_bad_input_errors_name_the_parameter():
    with pytest.raises(ValueError, match="'window' parameter of ZScore must be an int >= 2. Got 1"):
        ZScore(window=1).fit(np.zeros(10))
    with pytest.raises(ValueError, match="'z' parameter of ZScore"):
        ZScore(z=-1).fit(np.zeros(10))
    with pytest.raises(ValueError, match="'values' parameter of Pelt must be finite"):
        Pelt().fit([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="'steps' parameter of Pelt must be strictly increasing"):
        Pelt().fit([1.0, 2.0, 3.0], [0, 5, 5])
    with pytest.raises(ValueError, match="'model' parameter of Pelt"):
        Pelt(model="nope").fit(np.zeros(20))
    with pytest.raises(RuntimeError, match="not fitted"):
        Pelt().predict()
    with pytest.raises(ValueError, match="has no parameter 'windw'"):
        make_detector("zscore", windw=3)
    with pytest.raises(ValueError, match="kind 'null' but 1 true changes"):
        Fixture("x", np.zeros(10), truth=(5,), kind="null")


def test_user_fixture_plugs_in():
    rng = np.random.default_rng(5)
    steps = 5 * np.arange(300)
    vals = np.where(steps < 700, 1.0, 2.0) + rng.normal(0, 0.05, 300)
    fx = Fixture("mine", vals, truth=(700,), steps=steps, tolerance=5)
    rep = validate(Pelt(), [fx])
    assert rep.results[0].recall == 1.0 and rep.results[0].false_positives == 0
