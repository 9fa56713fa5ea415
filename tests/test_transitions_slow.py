"""Slow reproduction: the demo recorded under four conventions, then `dimscope analyze`."""

from __future__ import annotations

import pytest

import dimscope
from dimscope.analysis import analyze_run
from dimscope.recipes.demo import run_demo


@pytest.mark.slow
def test_demo_analysis_under_dimscope_and_ndtracker_conventions(tmp_path):
    path = tmp_path / "demo"
    run_demo(path, steps=2000, conventions=("centered", "uncentered"), tracker_kwargs={"mode": ("probe", "batch")})
    a = analyze_run(path, validity_replicates=3)
    assert a.validity.verdict == "VALID"
    assert set(a.conventions) == {"probe/centered", "probe/uncentered", "batch/centered", "batch/uncentered"}
    nf = a.noise.set_index(["layer", "metric", "convention"])
    assert (nf.xs("probe/centered", level="convention")["source"] == "bootstrap").all()
    assert (nf.xs("batch/uncentered", level="convention")["source"] == "series").all()
    # dimscope's convention: the first layer's stable rank collapses first
    ph = a.phases[(a.phases.convention == "probe/centered") & (a.phases.layer == "0") & (a.phases.metric == "stable_rank")]
    assert ph.iloc[0]["label"] == "collapse"
    # far fewer significant transitions than the seed's ~85, under every convention
    assert a.transition_counts()["significant"].sum() < 40
    # the sign of rho(stable rank, loss) flips with centering on the probe set
    c = a.correlations
    rho = c[(c.layer == "0") & (c.metric == "stable_rank") & (c.target == "loss")].set_index("convention")["rho"]
    assert rho["probe/centered"] > 0 and rho["probe/uncentered"] < -0.3  # 8000 steps: +0.87 vs -0.94
    s = a.sensitivity
    row = s[(s.layer == "0") & (s.metric == "stable_rank") & s.conclusion.str.startswith("rho")].iloc[0]
    assert row["holds"] == "no"
    run = dimscope.open_run(path)
    assert len(run.events("phase")) > 0 and run.artifact("transitions/validity")["verdict"] == "VALID"
