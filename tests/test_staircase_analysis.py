"""Staircase analysis on synthetic series with known drops; first-layer pre-training; the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dimscope.cli import main
from dimscope.staircase import analyze_staircase, loss_drops, pretrain_first_layer, trapezoid
from dimscope.staircase.analysis import coincidence, eps_rank_steps, find_rises, layer_ordering
from dimscope.staircase.pretrain import first_layers
from dimscope.staircase.recipe import tanh_mlp
from dimscope.store import open_run

DROPS = (300, 900, 1600)


def staircase_loss(n: int = 2000, drops=DROPS, width: float = 15.0, noise: float = 0.02, seed: int = 0) -> pd.Series:
    """log10(loss) = -Σ sigmoid((t - t_k)/width) (one decade per drop) plus multiplicative noise."""
    t = np.arange(n)
    log = -sum(1 / (1 + np.exp(-(t - d) / width)) for d in drops)
    rng = np.random.default_rng(seed)
    return pd.Series(10 ** (log + noise * rng.standard_normal(n)), index=t)


def ranks_at(steps_up, n: int = 2000, every: int = 10, layers=("a", "b")) -> pd.DataFrame:
    idx = np.arange(0, n, every)
    cols = {}
    for i, lay in enumerate(layers):
        cols[lay] = 3 + 2 * i + sum((idx >= s).astype(float) * (1 + i) for s in steps_up)
    return pd.DataFrame(cols, index=idx)


def test_loss_drops_found_at_known_steps_and_none_for_constant_rate_decay():
    d = loss_drops(staircase_loss().index, staircase_loss().to_numpy(), smooth=9)
    assert len(d) == 3
    np.testing.assert_allclose(d["step"].to_numpy(), DROPS, atol=10)
    np.testing.assert_allclose(d["size"].to_numpy(), 1.0, atol=0.15)  # one decade each
    assert ((d["start"] < DROPS) & (d["end"] > DROPS)).all()
    t = np.arange(2000)
    smooth_decay = 10 ** (-t / 1000 + 0.02 * np.random.default_rng(1).standard_normal(2000))
    assert len(loss_drops(t, smooth_decay, smooth=9)) == 0


def test_eps_rank_steps_ignore_flicker():
    idx = np.arange(0, 1000, 10)
    v = np.where(idx >= 500, 12.0, 10.0)
    v[[10, 30, 70]] += 1  # single-measurement flicker
    up = eps_rank_steps(idx, v, smooth=3)
    assert len(up) == 1 and up["step"].iloc[0] == pytest.approx(500, abs=10) and up["size"].iloc[0] == 2.0
    assert find_rises(idx, np.full(100, 5.0)).empty


def test_coincidence_full_when_aligned_none_when_shifted_and_chance_baseline():
    loss = staircase_loss()
    aligned = analyze_staircase(loss, ranks_at(DROPS))
    row = aligned.table.set_index("layer").loc["b"]
    assert row["n_drops"] == 3 and row["n_coinciding"] == 3 and row["share"] == 1.0
    assert 0.0 < row["chance_share"] < 0.5  # three narrow drops, three steps: chance is low
    assert aligned.params["tolerance"] == 30.0
    shifted = analyze_staircase(loss, ranks_at([s + 200 for s in DROPS]))
    assert (shifted.table["n_coinciding"] == 0).all()
    assert aligned.ordering["share_ordered"] == 1.0 and aligned.ordering["final"] == {"a": 6.0, "b": 11.0}
    pl = aligned.plateaus
    assert len(pl) == 4 and pl["start"].iloc[0] == 0 and pl["end"].iloc[-1] == 1999


def test_ordering_and_validation():
    r = pd.DataFrame({"a": [5, 6, 9], "b": [4, 7, 10]}, index=[0, 10, 20])
    assert layer_ordering(r, ["a", "b"])["share_ordered"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"'tolerance' parameter of coincidence must be a float >= 0.0. Got -1"):
        coincidence(pd.DataFrame(columns=["step", "start", "end", "size"]), pd.DataFrame(columns=["step"]), tolerance=-1, axis=[0, 1])
    with pytest.raises(ValueError, match=r"'loss' parameter of loss_drops must be > 0"):
        loss_drops([0, 1, 2], [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match=r"'smooth' parameter of find_rises must be an int >= 1. Got 0"):
        find_rises([0, 1, 2], [0, 1, 2], smooth=0)


def test_structured_pretraining_spreads_breakpoints_and_raises_eps_rank():
    q = trapezoid((-1, 1), 257)
    model = tanh_mlp(1, seed=0)
    assert first_layers(model) == ("0", "1")
    res = pretrain_first_layer(model, (-1, 1), points=q)
    assert res.before.count <= 6 and res.after.count >= 40  # default init: a handful; structured: most of 64
    assert res.after.eps == 1e-3 and res.after.weights == "trapezoid"
    w = model[0].weight.detach()[:, 0].double()
    bp = np.sort((-model[0].bias.detach().double() / w).numpy())
    np.testing.assert_allclose(bp, -1 + (np.arange(64) + 0.5) / 32, atol=1e-5)  # midpoints of 64 cells
    np.testing.assert_allclose(w.abs().numpy(), 32.0, rtol=1e-6)  # sharpness · n / |Ω|
    assert (w > 0).sum() == 32
    # later layers untouched
    ref = tanh_mlp(1, seed=0)
    assert torch.equal(ref[2].weight, model[2].weight)
    m2 = tanh_mlp(2, seed=0)
    r2 = pretrain_first_layer(m2, [(-1, 1), (-1, 1)], seed=1)
    assert r2.after.count > 2 * r2.before.count


def test_decorrelate_pretraining_lowers_its_objective_and_raises_normalized_eps_rank():
    model = tanh_mlp(1, seed=3)
    res = pretrain_first_layer(model, (-1, 1), method="decorrelate", steps=150, lr=3e-2, eps=1e-2, normalize=True)
    assert res.losses[-1] < 0.85 * res.losses[0]
    assert res.after.count > res.before.count
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "magic"}, r"'method' parameter of pretrain_first_layer must be one of"),
        ({"domain": [(-1, 1), (0, 1)]}, r"'domain' parameter has 2 axes but the first layer takes 1 inputs"),
        ({"sharpness": 0.0}, r"'sharpness' parameter of pretrain_first_layer must be a float > 0.0. Got 0.0"),
    ],
)
def test_pretrain_errors(kwargs, match):
    kw = {"domain": (-1, 1), **kwargs}
    with pytest.raises(ValueError, match=match):
        pretrain_first_layer(tanh_mlp(1), kw.pop("domain"), **kw)


def test_cli_quick_writes_artifacts_table_and_report_section(tmp_path, capsys):
    from dimscope.staircase.report import report_section

    run = tmp_path / "sc"
    rc = main(["staircase", "--quick", "--seeds", "1", "--steps", "60", "--every", "10", "--targets", "1d", "--workers", "1", "--run", str(run)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dimscope staircase" in out and "pretrained" in out and "plain" in out
    assert "spread = [min, max] over seeds" in " ".join(out.split())  # printed, not read as rich markup
    r = open_run(run)
    assert {"staircase/summary", "staircase/coincidence", "staircase/eps_rank", "staircase/loss", "staircase/config"} <= set(r.artifacts())
    summ = r.artifact("staircase/summary")
    assert list(summ["condition"]) == ["plain", "pretrained"] and (summ["n_seeds"] == 1).all()
    ranks = r.artifact("staircase/eps_rank")
    first = ranks[(ranks["step"] == 0) & (ranks["layer"].astype(str) == "1")].set_index("condition")["eps_rank"]
    assert first["pretrained"] > first["plain"]  # pre-training raised the first layer's ε-rank at step 0
    # the representative run is tracked into the run directory itself
    s = r.metric("eps_rank", "7", convention="function/eps=1e-3")
    assert list(s.index) == [0, 10, 20, 30, 40, 50]
    assert r.manifest["function_eps_rank"]["quadrature"]["kind"] == "trapezoid"
    sec = report_section(r)
    assert sec is not None and "{{fig:staircase_loss}}" in sec.html and "staircase_eps_1d" in sec.figures
    empty = tmp_path / "empty"
    from dimscope.store import RunStore

    RunStore(empty).close()
    assert report_section(open_run(empty)) is None


def test_pretrain_both_runs_structured_then_decorrelate_and_needs_a_linear():
    model = tanh_mlp(1, seed=1)
    res = pretrain_first_layer(model, (-1, 1), method="both", steps=20, lr=1e-2)
    assert res.method == "both" and len(res.losses) == 20 and res.after.count >= 40
    with pytest.raises(ValueError, match="needs a model with an nn.Linear first layer"):
        pretrain_first_layer(torch.nn.Sequential(torch.nn.Tanh()), (-1, 1))


def test_cli_checks_the_options_before_it_overwrites_a_run(tmp_path, capsys):
    from dimscope.cli import main
    from dimscope.store import RunStore

    run = tmp_path / "stair"
    with RunStore(run) as w:  # an earlier run's results
        w.put_artifact("staircase/summary", {"kept": True})
    for extra, says in ((["--method", "foo"], "The 'method' parameter of run_staircase (pretrain) must be one of"),
                        (["--sharpness", "0"], "The 'sharpness' parameter of run_staircase (pretrain) must be a float > 0.0"),
                        (["--targets", ""], "The 'targets' parameter of run_staircase must name at least one target")):
        assert main(["staircase", "--quick", "--seeds", "1", "--steps", "20", "--run", str(run), *extra]) == 2
        assert says in capsys.readouterr().err
        assert open_run(run).artifact("staircase/summary") == {"kept": True}  # not overwritten
