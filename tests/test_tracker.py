import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dimscope
from dimscope.capture import count_hooks


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model, tracker, steps=30, seed=0, bad_at=None, start=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(start, start + steps):
        x = torch.randn(32, 10, generator=g)
        if bad_at is not None and step >= bad_at:
            x = x * float("nan")
        y = (x[:, 0] > 0).long()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        tracker.step(step, loss=loss.item(), lr=0.05)


@pytest.mark.parametrize("background", [True, False, "batched"])
def test_probe_mode_values_match_direct_measurement(tmp_path, background):
    model = mlp()
    probe = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    with dimscope.Tracker(model, probe=probe, every=5, layers=["0", "3"], run=tmp_path / "r", background=background, weight_every=5) as tr:
        train(model, tr, steps=21)
    run = dimscope.open_run(tmp_path / "r")
    sr = run.metric("stable_rank", "3")
    assert list(sr.index) == [0, 5, 10, 15, 20]  # optimizer steps, not sample indices
    # the final measurement equals a direct computation on the final model
    model.eval()
    with torch.no_grad():
        h = model[:4](probe)
    assert sr.loc[20] == pytest.approx(dimscope.stable_rank(dimscope.spectrum(h)), rel=1e-9)
    loss = run.training("loss")
    assert len(loss) == 21 and list(loss.index) == list(range(21))
    assert list(run.training("lr").unique()) == [0.05]
    # weight space beside activation space
    w = run.metric("stable_rank", "0", space="weight")
    W = model[0].weight.detach().double()
    sv = torch.linalg.svdvals(W)
    assert w.loc[20] == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-9)
    # spectra stored in full and recomputable with another epsilon
    spec = run.spectra("0").loc[20]
    assert len(spec.values) == min(63, 32) and spec.n_samples == 64 and spec.centered
    rec = run.recompute("eps_rank", layer="0", eps=0.5)
    assert rec.loc[rec.step == 20, "value"].item() == dimscope.eps_rank(spec, eps=0.5)
    m = run.manifest
    assert m["layers"] == ["0", "3"] and m["every"] == 5 and m["probe_size"] == 64
    assert m["default_convention"] == "probe/centered" and "stable_rank" in m["metric_definitions"]


def test_probe_mode_restores_train_eval_and_grad_mode():
    model = mlp()
    model.train()
    model[2].eval()  # a user-frozen submodule stays frozen
    seen = {}

    def spy(mod, args, out):
        seen["training"] = mod.training
        seen["grad"] = torch.is_grad_enabled()

    h = model[0].register_forward_hook(spy)
    tr = dimscope.Tracker(model, probe=torch.randn(8, 10), every=1, layers="0", background=False)
    tr.step(0)
    tr.close()
    h.remove()
    assert seen == {"training": False, "grad": False}  # measured in eval mode under no_grad
    assert model.training and model[0].training and not model[2].training
    assert torch.is_grad_enabled()


def test_batch_mode_measures_training_forward(tmp_path):
    model = mlp()
    with dimscope.Tracker(model, every=10, layers="3", mode="batch", run=tmp_path / "b", weight_metrics=False) as tr:
        train(model, tr, steps=11)
    run = dimscope.open_run(tmp_path / "b")
    df = run.scalars(space="activation")
    assert set(df.convention) == {"batch/centered"}
    assert set(df.step) == {0, 10}
    spec = run.spectra("3").loc[10]
    assert spec.n_samples == 32  # the mini-batch, not a probe
    assert run.manifest["default_convention"] == "batch/centered"


def test_two_conventions_on_one_run(tmp_path):
    model = mlp()
    probe = torch.randn(40, 10)
    with dimscope.Tracker(model, probe=probe, every=5, layers="0", mode=("probe", "batch"), conventions=("centered", "uncentered"), run=tmp_path / "c") as tr:
        train(model, tr, steps=6)
    run = dimscope.open_run(tmp_path / "c")
    assert run.conventions == ["batch/centered", "batch/uncentered", "probe/centered", "probe/uncentered"]
    a = run.metric("participation_ratio", "0", convention="probe/centered")
    b = run.metric("participation_ratio", "0", convention="probe/uncentered")
    assert a.loc[5] != pytest.approx(b.loc[5])


def test_hook_count_unchanged_also_when_forward_raises():
    model = mlp()
    before = count_hooks(model)
    tr = dimscope.Tracker(model, probe=torch.randn(8, 10), mode=("probe", "batch"), every=1, layers="auto")
    assert count_hooks(model) == before + 4  # batch-mode hooks (3 layers, the attention_mask) live while the tracker does
    with pytest.warns(RuntimeWarning, match="batch mode found no training forward to measure"):
        tr.step(0)  # no training forward yet: batch mode says so, probe mode measures
    tr.close()
    assert count_hooks(model) == before
    # the training forward raises inside the with-block
    with pytest.raises(RuntimeError):
        with dimscope.Tracker(model, mode="batch", every=1, layers="auto") as tr:
            model(torch.randn(4, 11))
    assert count_hooks(model) == before
    # the probe forward raises inside a measurement
    bad_probe = torch.randn(8, 11)
    tr = dimscope.Tracker(model, probe=bad_probe, every=1, layers="auto", background=False)
    with pytest.raises(RuntimeError):
        tr.step(0)
    tr.close()
    assert count_hooks(model) == before


def test_nan_activations_warn_and_store_nan_while_training_goes_on(tmp_path):
    model = mlp()
    probe = torch.randn(16, 10)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with dimscope.Tracker(model, every=1, layers="3", mode="batch", run=tmp_path / "n", background=False, weight_metrics=False) as tr:
            train(model, tr, steps=8, bad_at=5)
    msgs = [str(x.message) for x in w]
    assert any("NaN or Inf activations (or values too large or too small for float64) in layer '3' at step 5" in m for m in msgs)
    s = dimscope.open_run(tmp_path / "n").metric("stable_rank", "3")
    assert list(s.index) == list(range(8))
    assert s.loc[:4].notna().all() and s.loc[5:].isna().all()
    assert probe is not None


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(every=0), ValueError, "The 'every' parameter of Tracker must be an int >= 1. Got 0 instead."),
        (dict(every=2.5), TypeError, "The 'every' parameter of Tracker must be an int >= 1. Got 2.5 instead."),
        (dict(layers=["fc9"]), ValueError, "Unknown layer 'fc9'"),
        (dict(probe=torch.randn(1, 10)), ValueError, "must hold at least 2 samples. Got 1."),
        (dict(probe=torch.randn(0, 10)), ValueError, "must hold at least 2 samples. Got 0."),
        (dict(probe=None), ValueError, "The 'probe' parameter of Tracker is required in probe mode"),
        (dict(probe="data"), TypeError, "The 'probe' parameter of Tracker must be a tensor"),
        (dict(mode="online"), ValueError, "The 'mode' parameter of Tracker must be one of 'probe', 'batch'. Got 'online'"),
        (dict(metrics=["rank"]), ValueError, "unknown metric 'rank'"),
        (dict(conventions=("whitened",)), ValueError, "The 'conventions' parameter of Tracker must be one of"),
        (dict(conventions="whitened"), ValueError, "The 'conventions' parameter of Tracker must be one of 'centered', 'uncentered'. Got 'whitened'"),
        (dict(metrics={"eps_rank": {"eps": -1}}), ValueError, "gives eps_rank a bad value: The 'eps' parameter of eps_rank must be a float >= 0.0 and < 1.0. Got -1"),
        (dict(metrics={"eps_rank": {"eps": 1.0}}), ValueError, "The 'eps' parameter of eps_rank must be a float >= 0.0 and < 1.0. Got 1.0"),
        (dict(metrics=3), TypeError, "The 'metrics' parameter must be a metric name, a list of names, or a dict of names to parameters. Got 3"),
        (dict(metrics={"eps_rank": [1]}), TypeError, "The 'metrics' parameter must map each metric to a dict of its parameters (or None). Got"),
        (dict(mode=None), TypeError, "The 'mode' parameter of Tracker must be 'probe', 'batch' or both (a string or a list of them). Got None"),
        (dict(conventions=5), TypeError, "The 'conventions' parameter of Tracker must be 'centered', 'uncentered' or both"),
        (dict(extensions=None), TypeError, "The 'extensions' parameter of Tracker must be a list of TrackerExtension objects. Got None"),
        (dict(overwrite="no", run="unused"), TypeError, "The 'overwrite' parameter of Tracker must be True or False. Got 'no' instead."),
        (dict(run=""), ValueError, "A run's path must name its folder or its dimscope.sqlite file. Got '', which would be the current directory"),
        (dict(metrics={"eps_rank": {"epsilon": 0.1}}), ValueError, "gives eps_rank an unknown parameter 'epsilon'. Its parameters: eps, relative."),
        (dict(metrics={"energy_rank": {"q": 2}}), ValueError, "gives energy_rank a bad value: The 'q' parameter of energy_rank must be"),
        (dict(commit_every=0), ValueError, "The 'commit_every' parameter of Tracker must be an int >= 1. Got 0 instead."),
        (dict(commit_seconds="x"), TypeError, "The 'commit_seconds' parameter of Tracker must be a float >= 0.0. Got 'x' instead."),
        (dict(queue_size=-1), ValueError, "The 'queue_size' parameter of Tracker must be an int >= 1. Got -1 instead."),
        (dict(seed="a"), TypeError, "The 'seed' parameter of Tracker must be an int. Got 'a' instead."),
        (dict(layers=3), TypeError, "The 'layers' parameter must be a module path, a glob, a list of them"),
        (dict(layers=["0", 3]), TypeError, "The 'layers' parameter must hold module paths or globs (str). Got 3 (int)"),
        (dict(extensions=[1]), TypeError, "The 'extensions' parameter of Tracker must hold TrackerExtension objects"),
        (dict(mode=("probe", "probe")), ValueError, "The 'mode' parameter of Tracker must not repeat a mode. Got ('probe', 'probe')."),
        (dict(conventions=("centered", "centered")), ValueError, "The 'conventions' parameter of Tracker must not repeat a convention."),
        # strings that bool() reads as True
        (dict(metrics={"eps_rank": {"relative": "no"}}), ValueError, "The 'relative' parameter of eps_rank must be True or False. Got 'no'"),
        (dict(weight_metrics="no"), TypeError, "The 'weight_metrics' parameter of Tracker must be True or False. Got 'no' instead."),
        (dict(grad_norm="False"), TypeError, "The 'grad_norm' parameter of Tracker must be True or False. Got 'False' instead."),
        (dict(run=123), TypeError, "The 'run' parameter of Tracker must be a folder path (str or os.PathLike) or None. Got 123 instead."),
    ],
)
def test_bad_input_errors(kwargs, exc, msg):
    args = dict(probe=torch.randn(8, 10), every=5, layers="auto")
    args.update(kwargs)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("*", r"\*")):
        dimscope.Tracker(mlp(), **args)


def test_not_a_module_and_bad_step():
    with pytest.raises(TypeError, match="The 'model' parameter of Tracker must be a torch.nn.Module. Got str instead."):
        dimscope.Tracker("model", probe=torch.randn(4, 2))
    tr = dimscope.Tracker(mlp(), probe=torch.randn(8, 10))
    with pytest.raises(ValueError, match="The 'step' parameter of Tracker.step must be an int >= 0. Got -1 instead."):
        tr.step(-1)
    tr.close()
    with pytest.raises(RuntimeError, match="closed"):
        tr.step(1)


def test_reopen_appends_and_overwrite_starts_afresh(tmp_path):
    model, probe = mlp(), torch.randn(16, 10)
    for start in (0, 100):
        with dimscope.Tracker(model, probe=probe, every=1, layers="0", run=tmp_path / "a") as tr:
            for s in range(start, start + 3):
                tr.step(s, loss=1.0)
    run = dimscope.open_run(tmp_path / "a")
    assert list(run.metric("stable_rank", "0").index) == [0, 1, 2, 100, 101, 102]
    assert len(run.manifest["sessions"]) == 2
    run.close()
    with dimscope.Tracker(model, probe=probe, every=1, layers="0", run=tmp_path / "a", overwrite=True) as tr:
        tr.step(7)
    assert list(dimscope.open_run(tmp_path / "a").metric("stable_rank", "0").index) == [7]


def test_an_appended_session_with_other_layers_hides_none(tmp_path):
    model, probe = mlp(), torch.randn(16, 10)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0"], run=tmp_path / "a") as tr:
        train(model, tr, steps=3)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["3"], run=tmp_path / "a") as tr:
        for s in range(3, 6):
            tr.step(s, loss=0.0)
    run = dimscope.open_run(tmp_path / "a")
    assert run.layers == ["3", "0"]  # the latest session's first
    rec = run.recompute("stable_rank")
    assert rec.groupby("layer").step.apply(list).to_dict() == {"0": [0, 1, 2], "3": [3, 4, 5]}


def test_an_appended_session_in_another_mode_keeps_the_runs_reading_convention(tmp_path):
    model, probe = mlp(), torch.randn(16, 10)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0"], run=tmp_path / "a") as tr:
        train(model, tr, steps=3)
    with dimscope.Tracker(model, every=1, layers=["0"], run=tmp_path / "a", mode="batch", conventions=("uncentered",),
                          metrics=["stable_rank"]) as tr:
        train(model, tr, steps=3, start=3)
    run = dimscope.open_run(tmp_path / "a")
    assert run.default_convention == "probe/centered"
    assert list(run.metric("stable_rank", "0").index) == [0, 1, 2]  # the first session's series, as before the append
    assert list(run.metric("stable_rank", "0", convention="batch/uncentered").index) == [3, 4, 5]
    assert run.manifest["modes"] == ["probe", "batch"] and run.manifest["conventions"] == ["centered", "uncentered"]
    assert [s["modes"] for s in run.manifest["sessions"]] == [["probe"], ["batch"]]
    assert run.manifest["sessions"][1]["metrics"] == {"stable_rank": {}}
    assert run.manifest["sessions"][0]["metrics"]["eps_rank"] == {"eps": 1e-3, "relative": True}  # with its parameters
    assert "eps_rank" in run.manifest["metric_definitions"]  # the first session's metrics keep their definitions


def test_run_readable_while_training_writes(tmp_path):
    model, probe = mlp(), torch.randn(16, 10)
    tr = dimscope.Tracker(model, probe=probe, every=1, layers="0", run=tmp_path / "live", commit_every=1, background=False)
    for s in range(5):
        tr.step(s, loss=float(s))
    reader = dimscope.open_run(tmp_path / "live")
    assert list(reader.metric("stable_rank", "0").index) == [0, 1, 2, 3, 4]
    tr.step(5)
    assert 5 in reader.metric("stable_rank", "0").index
    tr.close()


def test_export_csv_and_parquet(tmp_path):
    model = mlp()
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=tmp_path / "e") as tr:
        train(model, tr, steps=5)
    run = dimscope.open_run(tmp_path / "e")
    csv = run.export(tmp_path / "out", format="csv")
    df = pd.read_csv(csv)
    assert {"step", "layer", "metric", "value", "space", "convention"} <= set(df.columns)
    assert len(df) == len(run.scalars())
    pytest.importorskip("pyarrow")
    pq = run.export(tmp_path / "out.parquet", format="parquet")
    assert pd.read_parquet(pq).shape == df.shape
    with pytest.raises(ValueError, match="'format' parameter of Run.export"):
        run.export(tmp_path / "x", format="xlsx")
    with pytest.raises(ValueError, match=r"The 'out' parameter of Run.export must be a folder or a file ending in '.csv' \(format='csv'\). Got .*y.parquet"):
        run.export(tmp_path / "y.parquet", format="csv")
    with pytest.raises(ValueError, match="ending in '.csv'"):
        run.export(tmp_path / "e" / "notes.txt")
    # the run named by its database file: the export goes beside it, the database stays a database
    db = tmp_path / "e" / "dimscope.sqlite"
    assert dimscope.open_run(db).export(db) == tmp_path / "e" / "scalars.csv"
    assert len(dimscope.open_run(db).scalars()) == len(df)
    assert {"n_samples", "n_features", "centered", "ceiling", "params"} <= set(df.columns)
    with pytest.raises(KeyError, match=r"No layer 'fc9' in this run. Its layers: \['0'\]"):
        run.recompute("eps_rank", "fc9", eps=0.1)
    with pytest.raises(KeyError, match="No values for metric 'stable_rank' layer '0' space 'activation' convention 'batch/centered'"):
        run.metric("stable_rank", "0", convention="batch/centered")


def test_every_value_carries_what_it_was_measured_on(tmp_path):
    """n_samples, n_features, centered, the ceiling and the metrics' parameters come with every
    measured value, also when no spectrum is stored; a run written before the table existed opens."""
    import json
    import sqlite3

    model = mlp()
    probe = torch.randn(20, 10)  # layer "0": 20 x 32, capped by the probe: ceiling 19 centered, 20 uncentered
    with dimscope.Tracker(model, probe=probe, every=2, layers=["0", "3"], run=tmp_path / "m", spectra=None, weight_every=2,
                          conventions=("centered", "uncentered"), metrics={"eps_rank": {"eps": 1e-2}, "stable_rank": {}}) as tr:
        train(model, tr, steps=5)
    df = dimscope.open_run(tmp_path / "m").scalars()
    act = df[df.space == "activation"]
    assert len(act) == 3 * 2 * 2 * 2 and act[["n_samples", "n_features", "ceiling", "params"]].notna().all().all()
    shape = {(r.layer, r.convention): (r.n_samples, r.n_features, r.centered, r.ceiling) for r in act.itertuples()}
    assert shape == {("0", "probe/centered"): (20, 32, 1, 19), ("0", "probe/uncentered"): (20, 32, 0, 20),
                     ("3", "probe/centered"): (20, 16, 1, 16), ("3", "probe/uncentered"): (20, 16, 0, 16)}
    assert {json.loads(p)["eps_rank"]["eps"] for p in act.params} == {1e-2}
    assert json.loads(act.params.iloc[0]) == {"eps_rank": {"eps": 1e-2, "relative": True}}
    w = df[df.space == "weight"]
    assert {(r.layer, r.n_samples, r.n_features, r.centered, r.ceiling) for r in w.itertuples()} == {("0", 32, 10, 0, 10), ("3", 16, 32, 0, 16)}
    assert df[df.space == "training"][["n_samples", "params"]].isna().all().all()
    # a second session on the same run repeats steps 2 and 4 with another ε: each value keeps its own
    with dimscope.Tracker(model, probe=probe[:12], every=2, layers=["0"], run=tmp_path / "m", spectra=None, weight_metrics=False,
                          metrics={"eps_rank": {"eps": 0.5}}) as tr:
        for s in (2, 3, 4):
            tr.step(s, loss=0.0)
    both = dimscope.open_run(tmp_path / "m").scalars(space="activation", convention="probe/centered")
    rep = both[(both.layer == "0") & (both.metric == "eps_rank") & both.step.isin([2, 4])]
    assert len(rep) == 4
    assert sorted((json.loads(p)["eps_rank"]["eps"], n) for p, n in zip(rep.params, rep.n_samples)) == [(0.01, 20)] * 2 + [(0.5, 12)] * 2
    df = dimscope.open_run(tmp_path / "m").scalars()
    con = sqlite3.connect(tmp_path / "m" / "dimscope.sqlite")  # as a run of an older dimscope
    con.execute("DROP TABLE measured")
    con.commit()
    con.close()
    old = dimscope.open_run(tmp_path / "m").scalars()
    assert len(old) == len(df) and old["n_samples"].isna().all()


def test_conv_and_sequence_outputs():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    tr = dimscope.Tracker(conv, probe=torch.randn(6, 3, 5, 5), every=1, layers=["0", "2"], background=False, max_rows=100)
    vals = tr.step(0)
    tr.close()
    assert vals[("0", "stable_rank")] > 1 and math.isfinite(vals[("2", "participation_ratio")])
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    tr = dimscope.Tracker(layer, probe=torch.randn(4, 7, 16), every=1, layers="linear1", background=False)
    vals = tr.step(0)
    tr.close()
    assert 1 < vals[("linear1", "participation_ratio")] <= 27  # 28 tokens as samples, 32 features


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import dimscope
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = dimscope.Tracker(model, probe=torch.randn(32, 10), every=2, layers="auto", run=sys.argv[1],
                               commit_every=3, commit_seconds=3600)
    def report(store):
        with store._lock:
            n = store._con.execute(
                "SELECT COUNT(*) FROM scalars WHERE metric='stable_rank' AND layer='0' AND space='activation'"
            ).fetchone()[0]
        print("COMMITTED", n, flush=True)
    tracker.store.on_commit.append(report)
    step = 0
    while True:
        x = torch.randn(16, 10)
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        tracker.step(step, loss=loss.item())
        step += 1
        time.sleep(0.002)
    """
)


def test_sigkill_keeps_every_committed_measurement(tmp_path):
    """Commit policy: every 3 measurements here; a SIGKILL loses at most what was not yet committed."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(dimscope.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env)
    reported = []
    deadline = time.time() + 120
    try:
        while len(reported) < 8 and time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("COMMITTED"):
                reported.append(int(line.split()[1]))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert len(reported) == 8 and reported[-1] >= 3 * 7
    run = dimscope.open_run(tmp_path / "run")
    steps = list(run.metric("stable_rank", "0").index)
    # every measurement committed before the kill is there, contiguous from the start: 0, 2, 4, ...
    assert len(steps) >= reported[-1]
    assert steps == list(range(0, 2 * len(steps), 2))
    assert list(run.spectra("0").index) == steps
    assert run.training("loss").index.max() >= steps[-1]


@pytest.mark.parametrize("background", [True, False, "batched"])
def test_a_failing_measurement_warns_and_training_goes_on(tmp_path, background):
    class Broken(dimscope.Tracker):
        calls = 0

        def features_to_spectrum(self, X, center):
            Broken.calls += 1
            if Broken.calls == 2:  # the measurement of step 1
                raise np.linalg.LinAlgError("eigendecomposition did not converge")
            return super().features_to_spectrum(X, center)

    model = mlp()
    with pytest.warns(RuntimeWarning, match="a measurement failed and was skipped: LinAlgError"):
        with Broken(model, probe=torch.randn(16, 10), every=1, layers="0", run=tmp_path / "f", background=background) as tr:
            train(model, tr, steps=4)
    assert list(dimscope.open_run(tmp_path / "f").metric("stable_rank", "0").index) == [0, 2, 3]


@pytest.mark.parametrize("background", [True, False, "batched"])
def test_a_measurement_that_fails_as_a_whole_keeps_its_loss(tmp_path, background):
    class Broken(dimscope.Tracker):
        def _compute(self, m, results):
            if m.step == 1:
                raise RuntimeError("metrics failed")
            return super()._compute(m, results)

    model = mlp()
    with pytest.warns(RuntimeWarning, match="a measurement failed and was skipped"):
        with Broken(model, probe=torch.randn(16, 10), every=1, layers="0", run=tmp_path / "f", background=background,
                    commit_every=1) as tr:
            train(model, tr, steps=4)
    run = dimscope.open_run(tmp_path / "f")
    assert list(run.metric("stable_rank", "0").index) == [0, 2, 3]
    assert list(run.training("loss").index) == [0, 1, 2, 3]


def test_a_bfloat16_probe_is_hashed_and_measured(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8)).to(torch.bfloat16)
    probe = torch.randn(16, 4, dtype=torch.bfloat16)
    with dimscope.Tracker(model, probe=probe, layers=["0"], run=tmp_path / "b", every=1) as tr:
        tr.step(0, loss=1.0)
    run = dimscope.open_run(tmp_path / "b")
    assert len(run.manifest["probe_hash"]) == 16
    with torch.no_grad():
        want = dimscope.stable_rank(dimscope.spectrum(model(probe)))
    assert run.metric("stable_rank", "0")[0] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mode", ["probe", "batch"])
def test_a_layer_with_a_scalar_output_is_skipped_with_a_warning_naming_it(tmp_path, mode):
    class Penalty(nn.Module):
        def forward(self, x):
            return x.pow(2).mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.reg = nn.Linear(10, 8), Penalty()

        def forward(self, x):
            h = self.fc(x)
            return h + 0 * self.reg(h)

    model = Net()
    with pytest.warns(RuntimeWarning, match="layer 'reg' could not be measured at step 0 .* scalar"):
        with dimscope.Tracker(model, probe=torch.randn(16, 10), mode=mode, every=1, layers=["fc", "reg"], run=tmp_path / mode) as tr:
            for s in range(3):
                loss = model(torch.randn(16, 10)).pow(2).mean()
                loss.backward()
                tr.step(s, loss=loss.item())
    run = dimscope.open_run(tmp_path / mode)
    assert list(run.metric("stable_rank", "fc", convention=f"{mode}/centered").index) == [0, 1, 2]


class Tok(nn.Module):
    """Hugging Face style: token ids and an attention_mask in, (B, T, D) embeddings out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids)


def test_a_dict_probe_with_an_attention_mask_leaves_padding_out(tmp_path):
    """Hugging Face style probe: (B, T, D) outputs keep only the tokens the attention_mask marks."""

    torch.manual_seed(0)
    model = Tok()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (8, 5), generator=g)
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:3, 3:] = 0  # 6 padded positions
    ids[mask == 0] = 0
    with dimscope.Tracker(model, probe={"input_ids": ids, "attention_mask": mask}, every=1, layers=["emb"], run=tmp_path / "p",
                          weight_metrics=False) as tr:
        tr.step(0, loss=1.0)
    run = dimscope.open_run(tmp_path / "p")
    with torch.no_grad():
        real = model.emb(ids)[mask.bool()]
    assert real.shape == (34, 6) and run.manifest["probe_tokens"] == 34
    assert run.metric("stable_rank", "emb")[0] == pytest.approx(dimscope.stable_rank(dimscope.spectrum(real)), rel=1e-9)
    assert (run.scalars(space="activation").n_samples == 34).all()
    # a tuple probe (positional inputs): the mask is the element at attention_mask's position in forward
    with dimscope.Tracker(model, probe=(ids, mask), every=1, layers=["emb"], run=tmp_path / "t", weight_metrics=False) as tr:
        tr.step(0, loss=1.0)
    run = dimscope.open_run(tmp_path / "t")
    assert run.manifest["probe_tokens"] == 34 and (run.scalars(space="activation").n_samples == 34).all()


def test_batch_mode_leaves_the_training_batchs_padding_out(tmp_path):
    """Batch mode reads the attention_mask the model is called with, as probe mode reads the probe's."""

    torch.manual_seed(0)
    model = Tok()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    seen = []
    with dimscope.Tracker(model, every=1, layers=["emb"], run=tmp_path / "b", mode="batch", weight_metrics=False,
                          background=False) as tr:
        for step in range(3):
            ids = torch.randint(1, 20, (8, 5), generator=g)
            mask = torch.ones(8, 5, dtype=torch.long)
            mask[: step + 1, 2:] = 0  # 3, 6 and 9 padded positions
            ids[mask == 0] = 0
            # by keyword, by position (model(ids, mask)), by keyword
            loss = (model(ids, mask) if step == 1 else model(input_ids=ids, attention_mask=mask)).pow(2).mean()
            with torch.no_grad():
                seen.append(dimscope.stable_rank(dimscope.spectrum(model.emb(ids)[mask.bool()])))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr.step(step, loss=loss.item())
    run = dimscope.open_run(tmp_path / "b")
    df = run.scalars(space="activation").query("metric == 'stable_rank'")
    assert df.n_samples.tolist() == [37, 34, 31]
    assert df.value.to_numpy() == pytest.approx(seen, rel=1e-9)
    assert run.manifest["token_mask"] == "attention_mask"
    # token_mask=None (e.g. an encoder-decoder model): every position is measured, no hook reads the mask
    with dimscope.Tracker(model, every=1, layers=["emb"], run=tmp_path / "n", mode="batch", weight_metrics=False,
                          background=False, token_mask=None) as tr:
        assert count_hooks(model) == 1
        model(input_ids=ids, attention_mask=mask).sum().backward()
        tr.step(0)
    assert dimscope.open_run(tmp_path / "n").scalars(space="activation").n_samples.unique().tolist() == [40]
    with pytest.raises(TypeError, match="The 'token_mask' parameter of Tracker must be a str"):
        dimscope.Tracker(model, every=1, layers=["emb"], mode="batch", token_mask=True)
    with pytest.warns(UserWarning, match="the probe has no 'atention_mask'"):  # a misspelled key measures every position
        dimscope.Tracker(model, probe={"input_ids": ids, "attention_mask": mask}, every=1, layers=["emb"],
                         token_mask="atention_mask").close()


def test_dataframe_artifacts_keep_their_types(tmp_path):
    store = dimscope.RunStore(tmp_path / "a")
    df = pd.DataFrame({"layer": ["0", "2"], "metric": ["stable_rank", "rankme"], "value": [1.5, 2.0], "step": [10, 20]})
    store.put_artifact("analysis/x", df)
    store.put_artifact("arr", np.arange(6.0).reshape(2, 3))
    store.put_artifact("obj", {"verdict": "VALID", "n": 3})
    store.close()
    run = dimscope.open_run(tmp_path / "a")
    back = run.artifact("analysis/x")
    assert list(back["layer"]) == ["0", "2"]  # layer names stay strings
    assert back["value"].tolist() == [1.5, 2.0] and back["step"].tolist() == [10, 20]
    assert run.artifact("arr").shape == (2, 3)
    assert run.artifact("obj") == {"verdict": "VALID", "n": 3}
    assert run.artifacts() == ["analysis/x", "arr", "obj"]
    with pytest.raises(KeyError, match="No artifact 'missing'"):
        run.artifact("missing")


def test_weight_spectra_every_tenth_measurement_by_default(tmp_path):
    model = mlp()
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=tmp_path / "w") as tr:
        train(model, tr, steps=45)
    run = dimscope.open_run(tmp_path / "w")
    assert list(run.metric("stable_rank", "0", space="weight").index) == [0, 20, 40]
    assert len(run.metric("stable_rank", "0")) == 23
    assert run.manifest["weight_every"] == 20
    with pytest.raises(ValueError, match="The 'weight_every' parameter of Tracker must be an int >= 1. Got 0"):
        dimscope.Tracker(model, probe=torch.randn(4, 10), weight_every=0)
    # a period that is not a multiple of every: the first measurement of each block of 4 steps
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=3, weight_every=4, spectra_every=4, layers="0",
                          run=tmp_path / "w4") as tr:
        train(model, tr, steps=15)
    run = dimscope.open_run(tmp_path / "w4")
    assert list(run.metric("stable_rank", "0", space="weight").index) == [0, 6, 9, 12]
    assert list(run.spectra("0").index) == [0, 6, 9, 12]
    assert list(run.metric("stable_rank", "0").index) == [0, 3, 6, 9, 12]  # moment metrics in between
    first = run.spectra("0", limit=2)  # the first measurements only
    assert list(first.index) == [0, 6] and np.array_equal(first.loc[6].values, run.spectra("0").loc[6].values)
    with pytest.raises(ValueError, match="The 'limit' parameter of Run.spectra must be an int >= 1. Got 0"):
        run.spectra("0", limit=0)


def test_background_auto_batches_when_torch_uses_every_core(monkeypatch, tmp_path):
    model = mlp()
    probe = torch.randn(8, 10)
    import dimscope.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "_usable_cores", lambda: torch.get_num_threads())
    tr = dimscope.Tracker(model, probe=probe, every=1, commit_every=3)
    assert tr.batched and not tr.background
    assert tr.step(0) is None and tr.step(1) is None and tr.latest == {}  # buffered
    assert len(tr._pending) == 2 and tr.history == []  # noqa: SLF001
    tr.step(2)  # the third measurement computes all three
    assert tr._pending == [] and tr.latest[("0", "stable_rank")] > 1  # noqa: SLF001
    assert [r["step"] for r in tr.history if r["metric"] == "stable_rank" and r["layer"] == "0" and r["space"] == "activation"] == [0, 1, 2]
    tr.close()
    # beside a GPU's training too: the thread cost 2.5-3x more there (benchmarks/results/overhead_h200.txt)
    on_gpu = types.SimpleNamespace(_on_cpu=lambda: False)
    assert dimscope.Tracker._resolve_background(on_gpu, "auto") == "batched"
    monkeypatch.setattr(tracker_module, "_usable_cores", lambda: torch.get_num_threads() + 2)
    tr = dimscope.Tracker(model, probe=probe)
    assert tr.background is True and not tr.batched and tr.step(0) is None
    tr.close()
    assert dimscope.Tracker._resolve_background(on_gpu, "auto") == "thread"  # free cores: a thread, on any device
    tr = dimscope.Tracker(model, probe=probe, background=False)
    assert tr.step(0) is not None  # inline: step returns the values
    tr.close()
    with pytest.raises(ValueError, match="The 'background' parameter of Tracker must be True, False, 'batched' or 'auto'. Got 'yes'"):
        dimscope.Tracker(model, probe=probe, background="yes")
    with pytest.raises(ValueError, match="The 'background' parameter"):
        dimscope.Tracker(model, probe=probe, background="yes", run=tmp_path / "never")
    assert not (tmp_path / "never").exists()  # rejected before the store records a session


def _all_values(run):
    df = run.scalars()
    df = df[df.space != "training"]
    return df.set_index(["step", "layer", "metric", "space", "convention"]).value.sort_index()


def test_batched_measurements_equal_inline_ones(tmp_path):
    """The batched kernel (numpy syrk + LAPACK on a thread pool) gives the inline numbers."""
    runs = {}
    for where in (False, "batched"):
        model = mlp()
        probe = torch.randn(48, 10, generator=torch.Generator().manual_seed(3))
        with dimscope.Tracker(model, probe=probe, every=2, layers=["0", "3", "5"], mode=("probe", "batch"),
                              conventions=("centered", "uncentered"), run=tmp_path / str(where), background=where,
                              weight_every=4, commit_every=4) as tr:
            train(model, tr, steps=17)
        runs[where] = dimscope.open_run(tmp_path / str(where))
    a, b = _all_values(runs[False]), _all_values(runs["batched"])
    assert a.index.equals(b.index) and len(a) == 9 * 3 * 4 * 7 + 5 * 3 * 7
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-9, atol=1e-12)
    for layer in ("0", "3"):
        sa, sb = runs[False].spectra(layer), runs["batched"].spectra(layer)
        assert list(sa.index) == list(sb.index)
        for x, y in zip(sa.values, sb.values):
            assert (x.n_samples, x.n_features, x.centered) == (y.n_samples, y.n_features, y.centered)
            np.testing.assert_allclose(y.values, x.values, rtol=1e-9, atol=1e-12 * x.values[0])
    assert runs["batched"].training("loss").shape == (17,)


def test_batched_commits_every_commit_every_measurements_and_after_commit_seconds(tmp_path):
    model = mlp()
    tr = dimscope.Tracker(model, probe=torch.randn(16, 10), every=1, layers="0", run=tmp_path / "b", background="batched", commit_every=5)
    for s in range(4):
        tr.step(s, loss=1.0)
    df = dimscope.open_run(tmp_path / "b").scalars()
    assert df[df.space == "activation"].empty  # nothing computed or committed yet
    tr.step(4, loss=1.0)
    assert list(dimscope.open_run(tmp_path / "b").metric("stable_rank", "0").index) == [0, 1, 2, 3, 4]  # committed
    tr.close()
    tr = dimscope.Tracker(model, probe=torch.randn(16, 10), every=10, layers="0", run=tmp_path / "t", background="batched", commit_seconds=0.05)
    tr.step(0, loss=1.0)
    time.sleep(0.1)
    tr.step(1, loss=1.0)  # not a measured step, but the buffered measurement is older than commit_seconds
    assert list(dimscope.open_run(tmp_path / "t").metric("stable_rank", "0").index) == [0]
    tr.close()


@pytest.mark.parametrize("background", [True, False, "batched"])
def test_commit_seconds_holds_between_measurements_far_apart(tmp_path, background):
    """every=1000: the measurement of step 0 and the losses after it are committed commit_seconds
    later by a step that does not measure, not at the next measurement (what a SIGKILL would lose)."""
    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=1000, layers="0", run=tmp_path / "c",
                          background=background, commit_seconds=0.05)
    tr.step(0, loss=0.5)
    tr.step(1, loss=0.4)
    time.sleep(0.1)
    tr.step(2, loss=0.3)
    deadline = time.time() + 10
    while True:  # a background thread writes on its own time
        run = dimscope.open_run(tmp_path / "c")
        df = run.scalars()
        if (df.metric == "loss").sum() >= 3 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert list(run.metric("stable_rank", "0").index) == [0]
    assert list(run.training("loss").index) == [0, 1, 2]
    tr.close()


def test_a_slow_measurement_thread_does_not_stall_training_through_timed_commits(tmp_path):
    """The measurement thread is stuck in a measurement; training goes on with a commit due at every
    step (commit_seconds=0) and a queue of 2: at most one timed commit waits at a time."""
    import threading

    release = threading.Event()

    class Stuck(dimscope.Tracker):
        def features_to_spectrum(self, X, center):
            release.wait(30)
            return super().features_to_spectrum(X, center)

    tr = Stuck(mlp(), probe=torch.randn(16, 10), every=1000, layers="0", run=tmp_path / "s", background=True,
               queue_size=2, commit_seconds=0.0)
    done = threading.Event()

    def training():
        for s in range(200):
            tr.step(s, loss=float(s))
        done.set()

    t = threading.Thread(target=training)
    t.start()
    finished = done.wait(20)
    release.set()
    t.join()
    tr.close()
    assert finished
    run = dimscope.open_run(tmp_path / "s")
    assert list(run.training("loss").index) == list(range(200)) and list(run.metric("stable_rank", "0").index) == [0]


def test_without_a_run_directory_history_keeps_every_training_scalar():
    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=10000, layers="0", commit_seconds=1e9)
    for s in range(3000):
        tr.step(s, loss=float(s))
    tr.close()
    assert sorted(h["step"] for h in tr.history if h["metric"] == "loss") == list(range(3000))


def test_measurements_after_an_inference_mode_block_and_numpy_metric_parameters():
    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=1, layers="0", background=False,
                          metrics={"eps_rank": {"eps": np.float32(0.01), "relative": np.bool_(True)}, "stable_rank": {}})
    with torch.inference_mode():
        first = tr.step(0)
    later = [tr.step(s) for s in (1, 2)]
    tr.close()
    assert all(("0", "stable_rank") in v for v in [first, *later])
    assert tr.metric_spec["eps_rank"] == {"eps": pytest.approx(0.01), "relative": True}
    assert type(tr.metric_spec["eps_rank"]["relative"]) is bool


def test_batch_mode_hooks_live_only_before_measured_steps(tmp_path):
    model = mlp()
    hooks = []
    with dimscope.Tracker(model, every=5, layers="3", mode="batch", run=tmp_path / "a", weight_metrics=False) as tr:
        g = torch.Generator().manual_seed(0)
        for step in range(12):
            hooks.append(count_hooks(model))  # hooks for this step's forward (layer 3's, and the model's attention_mask)?
            model(torch.randn(32, 10, generator=g)).sum().backward()
            tr.step(step)
    assert hooks == [2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0]
    assert count_hooks(model) == 0
    assert list(dimscope.open_run(tmp_path / "a").metric("stable_rank", "3").index) == [0, 5, 10]
    # steps that skip the schedule: one warning, then every forward is recorded
    with pytest.warns(RuntimeWarning, match="not consecutive"):
        with dimscope.Tracker(model, every=5, layers="3", mode="batch", run=tmp_path / "s", weight_metrics=False) as tr:
            for step in (0, 3, 10, 13, 15, 20):
                model(torch.randn(32, 10)).sum().backward()
                tr.step(step)
    assert list(dimscope.open_run(tmp_path / "s").metric("stable_rank", "3").index) == [0, 15, 20]


def test_probe_features_are_seen_before_an_in_place_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    probe = torch.randn(64, 10)
    with dimscope.Tracker(model, probe=probe, layers="0", background=False, weight_metrics=False) as tr:
        got = tr.step(0)[("0", "stable_rank")]
    with torch.no_grad():
        want = dimscope.stable_rank(dimscope.spectrum(model[0](probe)))
    assert got == pytest.approx(want, rel=1e-9)


def test_the_measurement_thread_keeps_to_the_cores_training_leaves_free():
    """Its torch ops get an OpenMP team of their own: sized like training's, the two teams spin
    against each other (training measured twice as slow on 2 cores)."""
    from dimscope.tracker import TrackerExtension, _usable_cores

    seen = []

    class Threads(TrackerExtension):
        def on_features(self, tracker, step, features):
            return lambda: seen.append(torch.get_num_threads())  # runs on the measurement thread

    before = torch.get_num_threads()
    cores = _usable_cores()
    try:
        for training_threads in sorted({cores, max(1, cores // 2)}):
            torch.set_num_threads(training_threads)
            seen.clear()
            with dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=1, layers="0", background=True,
                                  extensions=[Threads()]) as tr:
                tr.step(0)
                tr.step(1)
            in_new_thread = []  # a thread started after close() takes training's count again
            t = threading.Thread(target=lambda: (torch.zeros(1 << 20).add_(1.0), in_new_thread.append(torch.get_num_threads())))
            t.start()
            t.join()
            assert seen == [max(1, cores - training_threads)] * 2
            assert torch.get_num_threads() == training_threads  # training's own team is left as it was
            assert in_new_thread == [training_threads]
        # beside an accelerator's training, whose CPU threads mostly wait, as many threads as training has
        on_gpu = types.SimpleNamespace(_on_cpu=lambda: False)
        assert dimscope.Tracker._thread_budget(on_gpu) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_overlapping_measurement_threads_put_torchs_thread_count_back_once_the_last_stops():
    def in_new_thread():
        out = []
        t = threading.Thread(target=lambda: (torch.zeros(1 << 20).add_(1.0), out.append(torch.get_num_threads())))
        t.start()
        t.join()
        return out[0]

    before = torch.get_num_threads()
    probe = torch.randn(16, 10)
    a = dimscope.Tracker(mlp(), probe=probe, every=1, layers="0", background=True)
    b = dimscope.Tracker(mlp(), probe=probe, every=1, layers="0", background=True)
    a.step(0)
    b.step(0)
    a.close()
    b.step(1)  # still measures, on its own thread team
    b.close()
    assert torch.get_num_threads() == before and in_new_thread() == before


def test_closing_on_another_thread_keeps_that_threads_torch_count():
    before = torch.get_num_threads()
    box = {}
    try:
        torch.set_num_threads(2)

        def build():  # built on a thread with one torch thread, closed on this one
            torch.set_num_threads(1)
            box["tr"] = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=1, layers="0", background=True)

        t = threading.Thread(target=build)
        t.start()
        t.join()
        box["tr"].step(0)
        box["tr"].close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_recompute_from_top_k_spectra_gives_only_what_they_determine(tmp_path):
    """spectra=K stores the top K eigenvalues and the trace: a recomputed value they do not determine is
    NaN with a warning, never a number computed from the top K alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3))
    with dimscope.Tracker(model, probe=torch.randn(200, 10), every=1, layers="0", run=tmp_path / "k", spectra=5,
                          weight_metrics=False) as tr:
        train(model, tr, steps=2)
    run = dimscope.open_run(tmp_path / "k")
    recorded = {m: run.metric(m, "0").to_numpy() for m in ("stable_rank", "eps_rank", "participation_ratio")}
    assert (recorded["eps_rank"] > 5).all()  # the tail mattered at training time
    assert run.recompute("stable_rank", "0").value.to_numpy() == pytest.approx(recorded["stable_rank"], rel=1e-12)
    for metric, params in (("participation_ratio", {}), ("effective_rank", {}), ("eps_rank", {}), ("energy_rank", {"q": 0.99})):
        with pytest.warns(RuntimeWarning, match=f"2 values of '{metric}' are NaN: the spectra were stored truncated"):
            assert run.recompute(metric, "0", **params).value.isna().all()
    # determined: fewer than K eigenvalues above 0.5·λ_1, and the top 5 holding 10 % of the trace
    s0 = run.spectra("0").iloc[0]
    top5 = s0.values
    assert run.recompute("eps_rank", "0", eps=0.5).value.iloc[0] == np.count_nonzero(top5 > 0.5 * top5[0]) < 5
    k = 1 + np.count_nonzero(np.cumsum(top5) < 0.1 * s0.trace)
    assert k <= 5 and run.recompute("energy_rank", "0", q=0.1).value.iloc[0] == k


def test_reader_series_are_float_and_bad_names_are_named(tmp_path):
    """An all-NaN series (NaN is stored as NULL) reads as float64 NaN, not objects; a typo in space or
    layer gets an error that names it."""
    model = nn.Sequential(nn.Linear(4, 6))
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))  # NaN from the start
    with pytest.warns(RuntimeWarning), dimscope.Tracker(model, probe=torch.randn(8, 4), every=1, layers="0", run=tmp_path / "n",
                                                         weight_metrics=False, grad_norm=True) as tr:
        for step in range(3):
            tr.step(step, loss=float("nan"))
    run = dimscope.open_run(tmp_path / "n")
    for s in (run.metric("stable_rank", "0"), run.training("loss"), run.training("grad_norm")):
        assert s.dtype == np.float64 and len(s) == 3 and s.isna().all()
    assert run.scalars().value.dtype == np.float64
    with pytest.raises(ValueError, match="The 'space' parameter of Run.metric must be one of .*Got 'activations'"):
        run.metric("stable_rank", "0", space="activations")
    with pytest.raises(ValueError, match="The 'space' parameter of Run must be one of"):
        run.spectra("0", space="activations")
    with pytest.raises(KeyError, match=r"No layer 'fc' in this run. Its layers: \['0'\]"):
        run.spectra("fc")


@pytest.mark.parametrize("background", [False, "batched"])
def test_a_failing_extension_is_reported_as_such_and_the_measurement_stands(tmp_path, background):
    class Flaky(dimscope.TrackerExtension):
        name = "flaky"

        def on_metrics(self, tracker, step, values):
            raise RuntimeError("extension bug")

    model = mlp()
    with pytest.warns(RuntimeWarning, match=r"the extension 'flaky' \(on_metrics\) failed at step 0; the measurement is kept"):
        with dimscope.Tracker(model, probe=torch.randn(10, 10), layers=["0"], run=tmp_path / "r", every=1,
                              background=background, extensions=[Flaky()]) as tr:
            ret = tr.step(0, loss=1.0)
            tr.step(1, loss=1.0)
    if background is False:
        assert ret[("0", "stable_rank")] > 0  # step() still returns what was measured
    assert list(dimscope.open_run(tmp_path / "r").metric("stable_rank", "0").index) == [0, 1]


def test_a_one_sample_batch_is_skipped_with_a_warning_not_recorded_as_collapse(tmp_path):
    model = mlp()
    with pytest.warns(RuntimeWarning, match=r"layer '0' could not be measured at step 0.*centered spectrum needs at least 2 samples"):
        with dimscope.Tracker(model, every=1, layers=["0"], run=tmp_path / "b", mode="batch", background=False,
                              weight_metrics=False, conventions=("centered", "uncentered")) as tr:
            model(torch.randn(1, 10)).sum().backward()
            values = tr.step(0)
    assert ("0", "stable_rank") not in values
    run = dimscope.open_run(tmp_path / "b")
    assert run.conventions == ["batch/uncentered"]  # one sample has an uncentered spectrum (its squared norm)
    assert run.metric("stable_rank", "0", convention="batch/uncentered").iloc[0] == pytest.approx(1.0)


def test_a_layer_the_forward_never_calls_is_named_and_a_probe_the_model_refuses_says_so(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head, self.head_old = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.enc(x))  # head_old is never called

    model = TwoHeads()
    with pytest.warns(RuntimeWarning, match=r"layer 'head_old' produced no output in the probe forward at step 0") as rec:
        with dimscope.Tracker(model, probe=torch.randn(10, 4), every=1, layers=["enc", "head_old"], run=tmp_path / "r") as tr:
            for step in range(3):
                tr.step(step)
    assert sum("head_old" in str(w.message) for w in rec) == 1  # once
    assert list(dimscope.open_run(tmp_path / "r").metric("stable_rank", "enc").index) == [0, 1, 2]
    with dimscope.Tracker(model, probe=torch.randn(10, 5), every=1, layers=["enc"]) as tr:
        with pytest.raises(RuntimeError) as err:  # the model's own error, with a note that names the probe
            tr.step(0)
    if hasattr(err.value, "add_note"):
        assert any("raised by the model's forward on the 'probe' of Tracker (tensor shapes [(10, 5)])" in n for n in err.value.__notes__)


def test_recompute_on_a_run_without_spectra_says_why(tmp_path):
    model = mlp()
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=1, layers="0", run=tmp_path / "n", spectra=None) as tr:
        train(model, tr, steps=2)
    with pytest.raises(KeyError, match=r"No stored spectra to recompute 'eps_rank' from for layer '0'.*spectra=None stores none"):
        dimscope.open_run(tmp_path / "n").recompute("eps_rank", "0", eps=0.1)


def test_starting_afresh_touches_only_the_old_runs_files_and_a_run_being_created_can_be_opened(tmp_path):
    import threading

    folder = tmp_path / "shared"
    folder.mkdir()
    with dimscope.RunStore(folder / "run_b.sqlite") as w:
        w.add_scalars([(0, 0.0, "", "loss", 1.0, "training", "")])
    (folder / "scalars.csv").write_text("the user's\n")
    (folder / "report").mkdir()
    (folder / "report" / "notes.md").write_text("mine\n")
    dimscope.RunStore(folder / "run_a.sqlite", overwrite=True).close()  # a run given by its file: neighbours untouched
    assert (folder / "scalars.csv").read_text() == "the user's\n" and (folder / "report" / "notes.md").exists()
    run = tmp_path / "r"
    with dimscope.RunStore(run) as w:
        w.add_scalars([(0, 0.0, "", "loss", 1.0, "training", "")])
    (run / "report").mkdir()
    for f in ("report/overview.png", "report/mine.png", "report/notes.md", "scalars.csv"):
        (run / f).write_text("x")
    (run / "report" / "report.html").write_text("<figcaption>overview.png</figcaption>")
    dimscope.RunStore(run, overwrite=True).close()  # the old run's folder: its report (page, its figures) and exports go
    assert sorted(p.name for p in (run / "report").iterdir()) == ["mine.png", "notes.md"] and not (run / "scalars.csv").exists()
    # an empty file is what a writer creating the run leaves for a moment: a reader waits for it
    db = tmp_path / "new" / "dimscope.sqlite"
    db.parent.mkdir()
    db.write_bytes(b"")
    t = threading.Timer(0.3, lambda: dimscope.RunStore(db.parent).close())
    t.start()
    assert dimscope.open_run(db.parent).layers == []
    t.join()


def test_spectra_limit_counts_steps_and_list_probes_read_the_mask(tmp_path):
    from dimscope.spectrum import Spectrum

    with dimscope.RunStore(tmp_path / "d") as w:
        w.set_manifest({"layers": ["0"], "default_convention": "probe/centered"})
        for step, vals in ((0, [3.0, 1.0]), (0, [5.0, 2.0]), (1, [4.0, 4.0])):  # step 0 measured twice
            w.add_spectrum(step, 0.0, "0", Spectrum(np.array(vals), 8, 2), space="activation", convention="probe/centered")
    run = dimscope.open_run(tmp_path / "d")
    assert {k: list(v.values) for k, v in run.spectra("0", limit=1).items()} == {0: [5.0, 2.0]}  # the latest of step 0
    assert list(run.spectra("0", limit=2).index) == [0, 1]
    model = Tok()
    ids, mask = torch.randint(1, 20, (8, 5)), torch.ones(8, 5, dtype=torch.long)
    mask[:4, 3:] = 0
    with dimscope.Tracker(model, probe=[ids, mask], every=1, layers=["emb"], run=tmp_path / "l", weight_metrics=False) as tr:
        tr.step(0)
    assert dimscope.open_run(tmp_path / "l").manifest["probe_tokens"] == 32


def test_a_layer_skipped_once_still_has_its_failures_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.aux = nn.Linear(4, 8), nn.Linear(8, 8)

        def forward(self, x, use_aux=True):
            h = self.enc(x)
            return self.aux(h) if use_aux else h

    model = Net()
    with pytest.warns(RuntimeWarning) as rec:
        with dimscope.Tracker(model, every=1, layers=["enc", "aux"], mode="batch", background=False, weight_metrics=False,
                              conventions=("centered", "uncentered")) as tr:
            model(torch.randn(16, 4), use_aux=False).sum().backward()  # aux not called: said once
            tr.step(0)
            model(torch.randn(1, 4)).sum().backward()  # one sample: aux and enc cannot be measured
            tr.step(1)
    msgs = [str(w.message) for w in rec]
    assert sum("'aux' produced no output in the training forward at step 0" in m for m in msgs) == 1
    assert any("'aux' could not be measured at step 1" in m for m in msgs)
    assert any("'enc' could not be measured at step 1" in m for m in msgs)


@pytest.mark.parametrize("background", [False, True, "batched"])
@pytest.mark.parametrize("deferred", [True, False])
@pytest.mark.parametrize("with_store", [True, False])
def test_tensor_scalars_keep_their_values_at_step_time(tmp_path, with_store, deferred, background, monkeypatch):
    """A tensor scalar on an accelerator is copied at step() and read when its row is written (here
    CPU tensors take that path when ``deferred``): the stored value is exactly the tensor's at step
    time, in its own dtype (float64 not read through float32), even when the caller changes the
    tensor afterwards; a measurement's values hold it as a float."""
    import dimscope.tracker as trk

    monkeypatch.setattr(trk, "_DEFER_CPU_SCALARS", deferred)
    run = tmp_path / "t" if with_store else None
    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=4, layers="0", run=run, background=background, commit_seconds=1e9)
    running = torch.zeros((), dtype=torch.float64)
    dtypes = [torch.float64, torch.bfloat16, torch.float32, torch.float16]
    expected, totals = [], []
    for s in range(10):
        running += 1.0 / 3.0  # changed in place after it was passed
        totals.append(running.item())
        loss = torch.tensor([0.1 + s / 7], dtype=dtypes[s % 4], requires_grad=True) * 2
        expected.append(loss.item())
        tr.step(s, loss=loss, total=running, lr=0.1)
        if s == 1:  # not a measured step: the row waits, as a tensor only when deferred
            waiting = {r[3]: r[4] for r in tr._train_rows if r[0] == 1}
            assert isinstance(waiting["loss"], torch.Tensor) == deferred and type(waiting["lr"]) is float
    tr.close()
    if with_store:
        got = dimscope.open_run(run).training("loss")
        total = dimscope.open_run(run).training("total")
    else:
        got = pd.Series({h["step"]: h["value"] for h in tr.history if h["metric"] == "loss"})
        total = pd.Series({h["step"]: h["value"] for h in tr.history if h["metric"] == "total"})
    assert got.sort_index().tolist() == expected
    assert total.sort_index().tolist() == totals
    assert tr.latest[("", "loss")] == expected[8] and type(tr.latest[("", "loss")]) is float


@pytest.mark.parametrize("deferred", [True, False])
def test_a_tensor_scalar_without_one_readable_value_is_refused_at_step(deferred, monkeypatch):
    import dimscope.tracker as trk

    monkeypatch.setattr(trk, "_DEFER_CPU_SCALARS", deferred)
    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=4, layers="0")
    with pytest.raises(ValueError, match=r"must have one element. Got shape \(2,\)"):
        tr.step(0, loss=torch.ones(2))
    with pytest.raises(TypeError, match="must be real"):
        tr.step(0, loss=torch.ones((), dtype=torch.complex64))
    with pytest.raises(ValueError, match="must hold a value. Got a tensor on the 'meta' device"):
        tr.step(0, loss=torch.ones((), device="meta"))
    tr.close()


def test_a_scalar_that_cannot_be_read_later_becomes_nan_alone_and_the_measurement_is_kept(tmp_path, monkeypatch):
    """The deferred read of tensor scalars fails (as in a failed CUDA context): the stacked read
    falls back to one value at a time, the unreadable one is NaN with a warning, and the others,
    the float scalars and the measured values are written."""
    import dimscope.tracker as trk

    monkeypatch.setattr(trk, "_DEFER_CPU_SCALARS", True)
    real_stack, real_item = torch.stack, torch.Tensor.item

    def failing_stack(ts, *a, **k):
        if all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in ts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_stack(ts, *a, **k)

    def item(t):
        v = real_item(t)
        if v == 13.0:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return v

    tr = dimscope.Tracker(mlp(), probe=torch.randn(16, 10), every=2, layers="0", run=tmp_path / "r", background=False)
    monkeypatch.setattr(trk.torch, "stack", failing_stack)
    monkeypatch.setattr(torch.Tensor, "item", item)
    with pytest.warns(RuntimeWarning, match="could not be read from its device"):
        for s in range(4):
            tr.step(s, loss=torch.tensor(13.0 if s == 1 else 1.0 + s), lr=0.1)
        tr.close()
    monkeypatch.undo()
    run = dimscope.open_run(tmp_path / "r")
    loss = run.training("loss")
    assert list(loss.index) == [0, 1, 2, 3] and np.isnan(loss[1]) and loss.drop(1).tolist() == [1.0, 3.0, 4.0]
    assert run.training("lr").tolist() == [0.1] * 4
    assert list(run.metric("stable_rank", "0").index) == [0, 2] and run.metric("stable_rank", "0").notna().all()


class _ReaderWhoCannotWrite:
    """A forked child that calls ``fn()`` whenever asked and sends back its result (or the exception
    it raised), as the 'nobody' user when the tests run as root (root writes anywhere); otherwise the
    caller makes the directory read-only. Forked before any connection to the run is open in this
    process, so that it inherits no SQLite state; the modules fn needs must be imported already (the
    child may not reach the virtual environment)."""

    def __init__(self, fn) -> None:
        import pickle

        cmd_r, self._cmd = os.pipe()
        self._res, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            try:
                os.close(self._cmd)
                os.close(self._res)
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                while os.read(cmd_r, 1) == b"r":
                    try:
                        out = fn()
                    except Exception as e:  # noqa: BLE001
                        out = e
                    data = pickle.dumps(out)
                    os.write(res_w, len(data).to_bytes(8, "little"))
                    for a in range(0, len(data), 65536):
                        os.write(res_w, data[a : a + 65536])
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(res_w)

    def _read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(self._res, n - len(out))
            assert chunk, "the reader process ended"
            out += chunk
        return out

    def __call__(self):
        import pickle

        os.write(self._cmd, b"r")
        return pickle.loads(self._read_exactly(int.from_bytes(self._read_exactly(8), "little")))

    def close(self) -> None:
        os.write(self._cmd, b"q")
        os.waitpid(self.pid, 0)
        os.close(self._cmd)
        os.close(self._res)


def _steps_as_read(run_dir: Path):
    """A reader that keeps one Run open across calls and returns the steps of layer 0's stable rank."""
    held = {}

    def read():
        if "run" not in held:
            held["run"] = dimscope.open_run(run_dir)
        return held["run"].metric("stable_rank", "0")

    return read


_WRITER = """
import sys, torch, dimscope
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
tr = dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=sys.argv[1], background=False)
for s in range(4):
    tr.step(s, loss=1.0)
tr.flush()
print("ready", flush=True)
sys.stdin.readline()
tr.close()
"""


def test_a_run_reads_where_its_directory_cannot_be_written():
    """A run on a read-only mount, or another user's: SQLite's WAL readers write an index beside the
    database, which failed there and was reported as 'a damaged SQLite database'. Now a closed run
    is read as an immutable file and reread when a writer resumes it; a run that another process is
    writing is read through its writer's index; a copy whose log holds data without the index gets a
    PermissionError that says why."""
    import shutil
    import tempfile

    if not hasattr(os, "geteuid") or not hasattr(os, "fork"):
        pytest.skip("POSIX users and fork are needed to read as a user who cannot write")
    base = Path(tempfile.mkdtemp(prefix="dimscope-ro-"))  # not under pytest's private tmp: the reader must reach it
    os.chmod(base, 0o755)
    readers = []
    try:
        model = mlp()
        with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=base / "done") as tr:
            train(model, tr, steps=6)
        with dimscope.open_run(base / "done") as reader:  # also imports what the reader needs
            want = reader.metric("stable_rank", "0")
        assert not (base / "done" / "dimscope.sqlite-wal").exists()

        # a closed run: read, then read again after a writer resumed it
        os.chmod(base / "done", 0o555)
        readers.append(_ReaderWhoCannotWrite(_steps_as_read(base / "done")))
        got = readers[-1]()
        assert isinstance(got, pd.Series) and got.equals(want)
        os.chmod(base / "done", 0o755)
        with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=base / "done") as tr:
            train(model, tr, steps=4, start=6)
        os.chmod(base / "done", 0o555)
        got = readers[-1]()
        assert isinstance(got, pd.Series) and list(got.index) == [0, 2, 4, 6, 8] and got.loc[[0, 2, 4]].equals(want)

        # a live run, written by another process (this one holds no connection to it)
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(base / "live")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "ready"
            os.chmod(base / "live", 0o555)
            readers.append(_ReaderWhoCannotWrite(_steps_as_read(base / "live")))
            got = readers[-1]()
            assert isinstance(got, pd.Series) and list(got.index) == [0, 2]
            # a copy of the database and its log made while training ran, without the index: its log cannot be
            # read without writing the index, and an immutable read would miss what the log holds
            (base / "copy").mkdir()
            for name in ("dimscope.sqlite", "dimscope.sqlite-wal"):
                (base / "copy" / name).write_bytes((base / "live" / name).read_bytes())
            assert (base / "copy" / "dimscope.sqlite-wal").stat().st_size > 0
            os.chmod(base / "copy", 0o555)
            readers.append(_ReaderWhoCannotWrite(_steps_as_read(base / "copy")))
            got = readers[-1]()
            assert isinstance(got, PermissionError) and "write-ahead log" in str(got) and "damaged" not in str(got)
        finally:
            writer.communicate("close\n", timeout=60)
        assert writer.returncode == 0
        os.chmod(base / "copy", 0o755)
        with dimscope.open_run(base / "copy") as copied:  # where it can be written, the log is read
            assert list(copied.metric("stable_rank", "0").index) == [0, 2]
    finally:
        for r in readers:
            r.close()
        for d in ("done", "live", "copy"):
            if (base / d).exists():
                os.chmod(base / d, 0o755)
        shutil.rmtree(base, ignore_errors=True)


class PrefixTok(Tok):
    """A model that puts a learned prefix token before the sequence: its output has T + 1 positions."""

    def __init__(self):
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(1, 1, 6))
        self.out = nn.Identity()

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.out(torch.cat([self.prefix.expand(h.shape[0], 1, 6), h], dim=1))


def test_a_layer_whose_positions_differ_from_the_masks_is_measured_whole_with_one_warning(tmp_path):
    """The attention mask is (B, T); a layer after a prefix token gives (B, T + 1, D): its padding
    cannot be dropped. It is measured on every position, with one warning naming it; the layer
    that matches the mask keeps only the real tokens. An all-ones mask (no padding) warns not."""
    model = PrefixTok()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (8, 5), generator=g)
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:3, 3:] = 0
    with pytest.warns(RuntimeWarning, match=r"layer 'out' gives \(B, T, D\) = \(8, 6, 6\) at step 0, but the attention mask is \(8, 5\)") as rec:
        with dimscope.Tracker(model, probe={"input_ids": ids, "attention_mask": mask}, every=1, layers=["emb", "out"],
                              run=tmp_path / "p", weight_metrics=False, background=False) as tr:
            for s in range(3):
                tr.step(s)
    assert sum("cannot be dropped" in str(w.message) for w in rec) == 1
    n = dimscope.open_run(tmp_path / "p").scalars(space="activation").groupby("layer").n_samples.unique()
    assert n["emb"].tolist() == [34] and n["out"].tolist() == [48]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dimscope.Tracker(model, probe={"input_ids": ids, "attention_mask": torch.ones(8, 5)}, every=1, layers=["out"],
                              run=tmp_path / "q", weight_metrics=False, background=False) as tr:
            tr.step(0)


def test_activations_too_small_for_float64_are_nan_with_a_warning_not_a_false_collapse(tmp_path):
    model = nn.Sequential(nn.Linear(10, 8, bias=False)).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with dimscope.Tracker(model, probe=torch.randn(16, 10, dtype=torch.float64) * 1e-170, every=1, layers="0",
                              run=tmp_path / "t", background=False, weight_metrics=False) as tr:
            tr.step(0)
    assert any("too small for float64) in layer '0' at step 0" in str(x.message) for x in w)
    assert dimscope.open_run(tmp_path / "t").metric("stable_rank", "0").isna().all()


def test_bad_scalars_name_their_keyword_and_leave_no_partial_step(tmp_path):
    with dimscope.Tracker(mlp(), probe=torch.randn(8, 10), every=100, layers="0", run=tmp_path / "r") as tr:
        with pytest.raises(TypeError, match="The scalar 'loss' passed to Tracker.step must be a number or a one-element tensor. Got '0.5'."):
            tr.step(1, loss="0.5")  # float() would parse it
        with pytest.raises(TypeError, match="The scalar 'x' passed to Tracker.step must be a number"):
            tr.step(1, x=np.array("0.5"))
        with pytest.raises(TypeError, match="The scalar 'acc' passed to Tracker.step must be a number or a one-element tensor. Got None."):
            tr.step(1, loss=1.0, acc=None)
        with pytest.raises(ValueError, match=r"The scalar 'acc' passed to Tracker.step must have one element. Got shape \(2,\)."):
            tr.step(1, loss=1.0, acc=torch.ones(2))
        tr.step(1, loss=2.0, acc=True)
    run = dimscope.open_run(tmp_path / "r")
    assert run.training("loss").tolist() == [2.0] and run.training("acc").tolist() == [1.0]


def test_a_one_dimensional_probe_output_that_is_not_one_value_per_input_warns(tmp_path):
    """A 1-D probe is one unbatched input: a Linear layer's (8,) output would be read as 8 samples."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(RuntimeWarning, match=r"layer '0' gives a 1-D output of 8 values for a probe of 4 inputs") as rec:
        with dimscope.Tracker(model, probe=torch.randn(4), layers=["0"], every=1, background=False, run=tmp_path / "r") as tr:
            tr.step(0)
            tr.step(1)
    assert sum("1-D output" in str(w.message) for w in rec) == 1


def test_run_readers_refuse_a_space_or_convention_the_run_does_not_store(tmp_path):
    model = mlp()
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=tmp_path / "r") as tr:
        train(model, tr, steps=4)
    run = dimscope.open_run(tmp_path / "r")
    with pytest.raises(ValueError, match="The 'space' parameter of Run.scalars must be one of 'activation', 'weight', 'training'. Got 'activations'"):
        run.scalars(space="activations")
    for call in (lambda: run.scalars(convention="centered"), lambda: run.spectra("0", convention="xx")):
        with pytest.raises(ValueError, match="The 'convention' parameter of Run must be one this run stores: 'probe/centered', 'weight'"):
            call()
    assert len(run.scalars(convention="probe/centered")) > 0 and len(run.spectra("0", convention="probe/centered")) == 2
    assert set(run.scalars(space="training", convention="").metric) == {"loss", "lr"}
    # declared by the run's session but not measured yet: empty, not an error
    with dimscope.Tracker(model, probe=torch.randn(16, 10), every=2, layers="0", run=tmp_path / "d", mode=("probe", "batch"),
                          background=False) as tr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch mode has had no training forward
            tr.step(0)
        tr.flush()
        live = dimscope.open_run(tmp_path / "d")
        assert len(live.scalars(convention="batch/centered")) == 0 and len(live.scalars(convention="probe/centered")) > 0
        live.close()
    with pytest.raises(ValueError, match="The 'metric' parameter names an unknown metric 'foo'"):
        run.recompute("foo")
    with pytest.raises(ValueError, match="The 'metric' parameter of Run.recompute gives stable_rank an unknown parameter 'eps'"):
        run.recompute("stable_rank", eps=0.1)
    assert run.recompute("eps_rank", eps=0.1).value.notna().all()
