"""Sinks: every value the Tracker stores comes back, identical, from each sink's own files."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dimscope
from dimscope.integrations.sinks import CSVSink, Sink, scalar_key

from _integration_helpers import (
    mlp,
    read_csv_sink,
    read_mlflow_files,
    read_tensorboard,
    read_wandb_offline,
    store_values,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _train(model, tracker, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(32, 12, generator=g)
        y = torch.randint(0, 3, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step(step, loss=loss.item())


def _assert_same(expected, got, rel=0.0):
    assert set(got) == set(expected), (sorted(set(expected) ^ set(got)))[:10]
    for k, v in expected.items():
        if math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, rel=rel, abs=0.0), k


def test_scalar_key():
    assert scalar_key("encoder.layers.3.mlp", "stable_rank") == "dimscope/encoder.layers.3.mlp/stable_rank"
    assert scalar_key("fc1", "weight/stable_rank") == "dimscope/fc1/weight/stable_rank"
    assert scalar_key("", "loss") == "dimscope/loss"


@pytest.mark.integration
def test_tensorboard_and_csv_sinks_mirror_the_store(tmp_path):
    pytest.importorskip("tensorboard")
    from dimscope.integrations.sinks import TensorBoardSink

    model = mlp()
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    tb, csv_path = tmp_path / "tb", tmp_path / "m.csv"
    with dimscope.Tracker(model, probe=probe, every=2, weight_every=2, run=str(tmp_path / "run"),
                          extensions=[TensorBoardSink(tb), CSVSink(csv_path)]) as tracker:
        _train(model, tracker)
    expected = store_values(tmp_path / "run")
    assert {s for s, _ in expected} == {0, 2, 4}
    assert (2, "dimscope/0/stable_rank") in expected and (4, "dimscope/4/weight/participation_ratio") in expected
    _assert_same(expected, read_tensorboard(tb), rel=1e-6)  # TensorBoard stores float32
    _assert_same(expected, read_csv_sink(csv_path))


@pytest.mark.integration
def test_tensorboard_sink_include_training_and_shared_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from dimscope.integrations.sinks import TensorBoardSink

    with pytest.raises(ValueError, match="exactly one of 'log_dir' or 'writer'"):
        TensorBoardSink()
    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_scalar("user/acc", 0.5, 0)
    model = mlp()
    probe = torch.randn(20, 12)
    with dimscope.Tracker(model, probe=probe, every=3, run=str(tmp_path / "run"), background=False,
                          extensions=[TensorBoardSink(writer=writer, include_training=True)]) as tracker:
        _train(model, tracker, steps=4)
    writer.close()
    got = read_tensorboard(tmp_path / "tb")
    run = dimscope.open_run(tmp_path / "run")
    loss = run.training("loss")
    assert got[(3, "dimscope/loss")] == pytest.approx(loss[3], rel=1e-6)
    assert got[(0, "user/acc")] == 0.5  # the user's own writer keeps working


@pytest.mark.integration
def test_mlflow_file_store_sink(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this flag
    from mlflow.tracking import MlflowClient

    from dimscope.integrations.sinks import MLflowSink

    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(uri, experiment="exp", run_name="tiny")
    model = mlp()
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    with dimscope.Tracker(model, probe=probe, every=2, run=str(tmp_path / "run"), extensions=[sink]) as tracker:
        _train(model, tracker)
    expected = store_values(tmp_path / "run")
    _assert_same(expected, read_mlflow_files(tmp_path / "mlruns", sink.run_id))
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(sink.run_id).info.status == "FINISHED"
    hist = client.get_metric_history(sink.run_id, "dimscope/2/stable_rank")
    assert {m.step: m.value for m in hist} == {s: v for (s, k), v in expected.items() if k == "dimscope/2/stable_rank"}


@pytest.mark.integration
def test_wandb_offline_sink(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from dimscope.integrations.sinks import WandbSink

    sink = WandbSink(dir=tmp_path / "wandb", project="tiny")
    assert sink.run is None  # nothing is opened before the sink is attached
    model = mlp()
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    with dimscope.Tracker(model, probe=probe, every=2, run=str(tmp_path / "run"), extensions=[sink]) as tracker:
        _train(model, tracker)
    run_dir = sink.run_dir
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "wandb" / "wandb"
    got = {}
    for row in read_wandb_offline(run_dir):
        step = row["dimscope/step"]
        got.update({(step, k): v for k, v in row.items() if k.startswith("dimscope/") and k != "dimscope/step"})
    _assert_same(store_values(tmp_path / "run"), got)


class _Broken(Sink):
    name = "broken"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def write(self, step, values):
        self.calls += 1
        raise OSError("disk full")


def test_failing_sink_warns_once_and_training_goes_on(tmp_path):
    broken, csv_sink = _Broken(), CSVSink(tmp_path / "ok.csv")
    model = mlp()
    probe = torch.randn(20, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dimscope.Tracker(model, probe=probe, every=1, run=str(tmp_path / "run"), background=False,
                              extensions=[broken, csv_sink]) as tracker:
            _train(model, tracker, steps=5)
    msgs = [str(w.message) for w in caught if "broken sink failed" in str(w.message)]
    assert len(msgs) == 1 and "disk full" in msgs[0] and "switched off" in msgs[0]
    assert broken.calls == 1 and isinstance(broken.failed, OSError)
    expected = store_values(tmp_path / "run")
    assert {s for s, _ in expected} == {0, 1, 2, 3, 4}
    _assert_same(expected, read_csv_sink(tmp_path / "ok.csv"))  # the other sink is unaffected


def test_sink_that_cannot_open_warns_and_training_goes_on(tmp_path):
    (tmp_path / "a_file").write_text("x")
    bad = CSVSink(tmp_path / "a_file" / "m.csv")  # its parent is a file: opening fails
    model = mlp()
    with pytest.warns(RuntimeWarning, match="the CSV sink failed .*switched off"):
        with dimscope.Tracker(model, probe=torch.randn(20, 12), every=1, run=str(tmp_path / "run"),
                              background=False, extensions=[bad]) as tracker:
            _train(model, tracker, steps=3)
    assert bad.failed is not None and bad.n_written == 0
    assert dimscope.open_run(tmp_path / "run").metric("stable_rank", "0").index.tolist() == [0, 1, 2]


def test_no_integration_package_is_imported_by_the_training_path(tmp_path):
    code = f"""
import sys, torch
import dimscope, dimscope.integrations, dimscope.integrations.sinks, dimscope.integrations.distributed
from dimscope.integrations.sinks import CSVSink
m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
with dimscope.Tracker(m, probe=torch.randn(10, 4), every=1, run={str(tmp_path / 'r')!r},
                      extensions=[CSVSink({str(tmp_path / 'c.csv')!r})]) as t:
    t.step(0, loss=1.0)
bad = [p for p in ("lightning", "pytorch_lightning", "transformers", "tensorboard", "mlflow", "wandb",
                   "torch.utils.tensorboard", "matplotlib") if p in sys.modules]
print("LOADED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": ""},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def test_sink_parameter_errors(monkeypatch):
    pytest.importorskip("wandb")
    from dimscope.integrations.sinks import MLflowSink, WandbSink

    with pytest.raises(ValueError, match="The 'mode' parameter of WandbSink must be one of 'offline', 'online', "
                                         "'disabled'. Got 'onlin' instead."):
        WandbSink(mode="onlin")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    with pytest.raises(ImportError, match=r"MLflowSink needs the 'mlflow' package: pip install 'dimscope\[mlflow\]'"):
        MLflowSink()
