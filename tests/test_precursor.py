"""The precursor-gap logic on synthetic curves with known timings, and the linear probes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dimscope.analysis import precursor_gap
from dimscope.analysis.precursor import (
    collapse_minimum,
    collapse_order,
    collapse_reach,
    seed_interval,
    t_behaviour,
    t_geometry,
)
from dimscope.probes import LinearProbe, probe_layers, probe_split

STEPS = np.arange(0, 3001, 25)
CHANCE = 1 / 53


def accuracy_curve(t_jump: int, *, seed: int = 0, spike_at: int | None = None) -> pd.Series:
    """Chance until ``t_jump`` (exclusive), then 1.0; small noise; optional one-evaluation spike."""
    rng = np.random.default_rng(seed)
    v = np.where(STEPS >= t_jump, 1.0, CHANCE) + rng.uniform(-0.004, 0.004, len(STEPS))
    if spike_at is not None:
        v[STEPS == spike_at] = 0.9
    return pd.Series(np.clip(v, 0, 1), index=STEPS)


def rankme_curve(t_min: int, t_rise: int, *, seed: int = 0, floor: float = 2.0, sigma: float = 0.005, slope: float = 0.01) -> pd.Series:
    """20 → ``floor`` (linear fall until ``t_min``), flat with N(0, sigma) noise, linear rise from ``t_rise``."""
    rng = np.random.default_rng(seed)
    v = np.where(STEPS <= t_min, 20 - (20 - floor) * STEPS / t_min, floor)
    v = v + np.where(STEPS > t_rise, slope * (STEPS - t_rise), 0.0)
    v = v + rng.normal(0, sigma, len(STEPS))
    return pd.Series(v, index=STEPS)


def test_t_behaviour_known_step_and_ignores_a_transient_spike():
    acc = accuracy_curve(2000, spike_at=1000)
    assert t_behaviour(acc, CHANCE, k=3) == 2000
    # with k = 1 the one-evaluation spike counts: persistence is what removes it
    assert t_behaviour(acc, CHANCE, k=1) == 1000
    # no gain over chance: undefined
    flat = pd.Series(np.full(len(STEPS), CHANCE), index=STEPS)
    assert t_behaviour(flat, CHANCE) is None


def test_t_geometry_known_rise_many_noise_seeds():
    # the rise starts after step 1200 at 0.25 per checkpoint; noise sigma 0.02, threshold 3 sigma = 0.06:
    # the first checkpoint above it is 1225. A noise value > 3 sigma at 1200, just before the rise, can
    # make it one checkpoint early; nothing earlier may trigger on the flat floor.
    found = [t_geometry(rankme_curve(500, 1200, seed=s, sigma=0.02)) for s in range(60)]
    assert set(found) <= {1200, 1225}, found
    assert found.count(1225) >= 55
    # a curve that never recovers has no t_geo
    never = rankme_curve(500, 5000)
    assert t_geometry(never) is None


def test_t_geometry_noise_scale_matters():
    # the same rise, but 10x noisier (sigma 0.2 -> threshold ~0.6 = 2.4 checkpoints of rise)
    found = [t_geometry(rankme_curve(500, 1200, seed=s, sigma=0.2)) for s in range(60)]
    assert all(1150 <= t <= 1375 for t in found), found
    assert 1250 <= np.median(found) <= 1300


def test_collapse_minimum_and_reach():
    r = rankme_curve(500, 1200, sigma=0.0)
    step, value = collapse_minimum(r)
    assert step == 500 and value == pytest.approx(2.0)
    # within 12 % of the fall (18 * 0.12 = 2.16 above the floor): 20 - 18 t / 500 <= 4.16 -> t >= 440
    assert collapse_reach(r, 0.12) == 450


def test_collapse_order_labels():
    assert collapse_order({"l0": 500, "l1": 300, "l2": 100}) == "top-down"
    assert collapse_order({"l0": 100, "l1": 300}) == "bottom-up"
    assert collapse_order({"l0": 300, "l1": 300}) == "simultaneous"
    assert collapse_order({"l0": 300, "l1": 100, "l2": 200}) == "mixed"
    assert collapse_order({"l0": 300}) == "single layer"


def test_precursor_gap_single_seed_known_gap():
    res = precursor_gap(accuracy_curve(2000), rankme_curve(500, 1200), chance=CHANCE)
    row = res.per_seed.iloc[0]
    assert row["t_geo"] == 1225 and row["t_beh"] == 2000
    assert row["gap_geo"] == 775 and row["gap_geo_ckpt"] == 31
    assert row["spacing"] == 25
    assert row["verdict_geo"] == "precursor"
    assert res.summary["geo"]["verdict"] == "precursor"


def test_gap_of_one_spacing_is_not_a_precursor_and_simultaneous_is_none():
    # geometry rises one checkpoint before behaviour: gap 25 == spacing -> not a precursor
    r = rankme_curve(500, 1950)  # first checkpoint above threshold: 1975
    res = precursor_gap(accuracy_curve(2000), r, chance=CHANCE)
    assert res.per_seed.iloc[0]["gap_geo"] == 25
    assert res.per_seed.iloc[0]["verdict_geo"] == "none"
    # easy task: both at once
    res = precursor_gap(accuracy_curve(525), rankme_curve(300, 500), chance=CHANCE)
    assert res.per_seed.iloc[0]["gap_geo"] == 0
    assert res.summary["geo"]["verdict"] == "none"


def test_precursor_gap_over_seeds_interval_and_layers():
    t_rises = {0: 1100, 1: 1200, 2: 1400}  # t_geo = rise + 25
    t_jumps = {0: 2000, 1: 2100, 2: 2500}
    beh = {s: accuracy_curve(t_jumps[s], seed=s) for s in t_rises}
    # two layers: the deeper one ("blocks.1") collapses earlier (top-down)
    geo = {s: {"blocks.0": rankme_curve(600, t_rises[s] + 100, seed=10 + s), "blocks.1": rankme_curve(400, t_rises[s], seed=s)} for s in t_rises}
    probe = {s: {"blocks.0": accuracy_curve(t_jumps[s] - 500, seed=20 + s), "blocks.1": accuracy_curve(t_jumps[s] - 300, seed=30 + s)} for s in t_rises}
    res = precursor_gap(beh, geo, probe, chance=CHANCE)
    gaps = [t_jumps[s] - (t_rises[s] + 25) for s in t_rises]
    assert list(res.per_seed["gap_geo"]) == gaps
    assert list(res.per_seed["gap_probe"]) == [300, 300, 300]
    assert list(res.per_seed["layer"]) == ["blocks.1"] * 3  # the deepest layer is the headline
    mean = np.mean(gaps)
    half = stats.t.ppf(0.975, 2) * np.std(gaps, ddof=1) / math.sqrt(3)
    g = res.summary["geo"]
    assert g["mean"] == pytest.approx(mean) and g["lo"] == pytest.approx(mean - half) and g["hi"] == pytest.approx(mean + half)
    assert g["verdict"] == "precursor"  # lo = 875 - 4.3 * 35 ... well above 25
    assert res.summary["probe"]["verdict"] == "precursor"
    assert set(res.per_seed["collapse_order"]) == {"top-down"}
    assert res.summary["collapse_order"] == "top-down"
    # per-layer table: t_geo of the shallow layer is 100 steps later
    pl = res.per_layer.set_index(["seed", "layer"])
    for s in t_rises:
        assert pl.loc[(s, "blocks.0"), "t_geo"] - pl.loc[(s, "blocks.1"), "t_geo"] == 100
    # choosing the shallow layer moves the headline
    res0 = precursor_gap(beh, geo, probe, chance=CHANCE, layer="blocks.0")
    assert list(res0.per_seed["gap_geo"]) == [g - 100 for g in gaps]


def test_inconclusive_when_the_interval_reaches_below_the_spacing():
    beh = {s: accuracy_curve(2000, seed=s) for s in range(3)}
    geo = {0: rankme_curve(500, 1200), 1: rankme_curve(500, 1950, seed=1), 2: rankme_curve(500, 1975, seed=2)}
    res = precursor_gap(beh, {s: {"x": c} for s, c in geo.items()}, chance=CHANCE)
    assert list(res.per_seed["verdict_geo"]) == ["precursor", "none", "none"]
    assert res.summary["geo"]["mean"] > 25
    assert res.summary["geo"]["verdict"] == "inconclusive"


def test_seed_interval_ignores_missing_and_bad_params_are_named():
    st = seed_interval([10.0, None, float("nan"), 20.0])
    assert st["n"] == 2 and st["mean"] == 15.0
    with pytest.raises(ValueError, match="'k' parameter of precursor_gap must be an int >= 1. Got 0"):
        precursor_gap(accuracy_curve(2000), rankme_curve(500, 1200), k=0)
    with pytest.raises(TypeError, match="unknown parameter"):
        precursor_gap(accuracy_curve(2000), rankme_curve(500, 1200), bogus=1)
    with pytest.raises(ValueError, match="'layer' parameter names 'nope'"):
        precursor_gap(accuracy_curve(2000), {"a": rankme_curve(500, 1200)}, layer="nope")


# --- probes ------------------------------------------------------------------------------------------


def test_probe_split_is_fixed_by_seed():
    a, b = probe_split(100, 0.3, seed=4), probe_split(100, 0.3, seed=4)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test) and a.key() == b.key()
    assert len(a.test) == 30 and not set(a.train) & set(a.test) and a.n == 100
    assert probe_split(100, 0.3, seed=5).key() != a.key()
    with pytest.raises(ValueError, match="'test_fraction' parameter of probe_split"):
        probe_split(100, 1.5)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_linear_probe_reads_linear_information_and_not_noise(kind):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 600)
    X = 1.5 * rng.normal(size=(5, 20))[y] + rng.normal(size=(600, 20))  # class means: linearly decodable
    split = probe_split(600, 0.3, seed=0)
    acc = probe_layers({"lin": X, "noise": rng.normal(size=(600, 20))}, y, split, kind=kind)
    assert acc["lin"]["test_acc"] > 0.9
    assert acc["noise"]["test_acc"] < 0.35  # chance 0.2 (5 balanced-ish classes)
    with pytest.raises(ValueError, match="'kind' parameter of LinearProbe must be one of"):
        LinearProbe(kind="svm").fit(X, y)
