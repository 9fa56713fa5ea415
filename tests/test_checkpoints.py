"""Checkpoint series: both layouts, order, laziness, clear errors, and the per-checkpoint analysis."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dimscope import open_run
from dimscope.checkpoints import CheckpointError, CheckpointSeries, analyze_checkpoints
from dimscope.metrics import rankme
from dimscope.probes import LinearProbe, probe_split
from dimscope.spectrum import spectrum
from dimscope.store import RunStore

PYTHIA_STEPS = [0, 2, 4, 512, 1000]


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _write_state_dicts(folder, steps, fmt):
    sds = {}
    for s in steps:
        torch.manual_seed(s)
        sd = small_mlp().state_dict()
        sds[s] = sd
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(folder / f"ckpt-{s}.safetensors"))
        else:
            torch.save({"model_state_dict": sd, "step": s} if s % 2 else sd, folder / f"step_{s}.pt")
    return sds


@pytest.fixture(scope="module")
def hf_series(tmp_path_factory):
    """A tiny GPT-NeoX (Pythia's architecture) built from a config, saved as step<N>/ folders."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pythia")
    cfg = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, rotary_pct=0.25,
    )
    saved = {}
    for s in PYTHIA_STEPS:
        torch.manual_seed(s)
        model = transformers.GPTNeoXForCausalLM(cfg)
        model.save_pretrained(root / f"step{s}")
        saved[s] = model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.detach().clone()
    return root, saved


def test_hf_folders_load_in_numeric_step_order(hf_series):
    root, saved = hf_series
    series = CheckpointSeries(root)
    assert series.layout == "hf"
    assert series.steps == PYTHIA_STEPS  # numeric, not "step1000" < "step2"
    for step, model in series.iter_models():
        assert type(model).__name__ == "GPTNeoXForCausalLM"
        assert not model.training
        assert torch.equal(model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight, saved[step])
    sub = CheckpointSeries(root, steps=[1000, 2])
    assert sub.steps == [2, 1000]


def test_hf_series_analysis_matches_an_independent_computation(hf_series, tmp_path):
    import transformers

    root, _ = hf_series
    series = CheckpointSeries(root)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    y = np.arange(96) % 3  # one label per token row (8 x 12 tokens)
    split = probe_split(96, 0.25, seed=1)
    with RunStore(tmp_path / "run") as store:
        df = analyze_checkpoints(
            series, probe_inputs=ids, layers=["gpt_neox.layers.0", "gpt_neox.layers.1"], targets=y, split=split, store=store,
            behaviour=lambda model, out: float(out.logits.float().mean()), metrics=["rankme", "stable_rank"],
        )
    run = open_run(tmp_path / "run")
    assert run.layers == ["gpt_neox.layers.0", "gpt_neox.layers.1"]
    rk = run.metric("rankme", "gpt_neox.layers.0")
    assert list(rk.index) == PYTHIA_STEPS
    # independent: load step 4 ourselves and take hidden_states[1] (the output of layer 0; the last entry of
    # hidden_states has the final LayerNorm applied, so it is not layer 1's output)
    model = transformers.GPTNeoXForCausalLM.from_pretrained(root / "step4").eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    X = out.hidden_states[1].reshape(-1, 32)
    assert rk.loc[4] == pytest.approx(rankme(spectrum(X)), rel=1e-9)
    assert run.training("behaviour").loc[4] == pytest.approx(float(out.logits.mean()), rel=1e-5)
    p = LinearProbe().fit(X[split.train].numpy(), y[split.train])
    assert run.metric("probe_acc", "gpt_neox.layers.0").loc[4] == pytest.approx(p.score(X[split.test].numpy(), y[split.test]))
    assert len(df) == len(PYTHIA_STEPS) * (2 * (2 + 2) + 1)
    assert run.manifest["probe_split"]["key"] == split.key()
    sc = run.scalars(space="activation")  # every value with what it was measured on: 96 token rows x 32 features
    dim = sc[sc.metric.isin(["rankme", "stable_rank"])]
    assert len(dim) == 2 * 2 * len(PYTHIA_STEPS)
    assert (dim.n_samples == 96).all() and (dim.n_features == 32).all() and (dim.ceiling == 32).all() and (dim.centered == 1).all()
    assert sc[sc.metric.str.startswith("probe_")].n_samples.isna().all()  # a probe's accuracy is not described by the spectrum's shape


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_files_load_with_a_factory(tmp_path, fmt):
    sds = _write_state_dicts(tmp_path, [100, 5, 20], fmt)
    series = CheckpointSeries(tmp_path, model_factory=small_mlp)
    assert series.layout == "state_dict" and series.steps == [5, 20, 100]
    seen = []
    for step, model in series.iter_models():
        seen.append(step)
        for k, v in model.state_dict().items():
            assert torch.equal(v, sds[step][k])
    assert seen == [5, 20, 100]
    with pytest.raises(ValueError, match="'model_factory' parameter of CheckpointSeries is required"):
        CheckpointSeries(tmp_path)


def test_missing_and_corrupt_checkpoints_are_named_and_skipped(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    _write_state_dicts(folder, [0, 10, 20, 30], "safetensors")
    bad = folder / "ckpt-20.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors file")
    series = CheckpointSeries(folder, model_factory=small_mlp)
    with pytest.raises(CheckpointError, match=r"ckpt-20\.safetensors \(step 20\)") as ei:
        series.load(20)
    assert ei.value.path == bad and ei.value.step == 20
    # a file deleted after discovery
    gone = folder / "ckpt-30.safetensors"
    gone.unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-30\.safetensors \(step 30\) is missing"):
        series.load(30)
    # a step asked for that is not in the folder
    with pytest.raises(CheckpointError, match=r"step\(s\) \[40\] are missing .*step40"):
        CheckpointSeries(folder, model_factory=small_mlp, steps=[0, 40])
    # the analysis reports and skips them, and measures the rest
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    with RunStore(tmp_path / "run") as store, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = analyze_checkpoints(series, probe_inputs=X, layers=["0", "2"], store=store, metrics=["rankme"])
    assert sorted(df["step"].unique()) == [0, 10]
    msgs = [str(w.message) for w in caught]
    assert any("ckpt-20.safetensors" in m for m in msgs) and any("ckpt-30.safetensors" in m for m in msgs)
    run = open_run(tmp_path / "run")
    alerts = run.events("alert")
    assert sorted(alerts["step"]) == [20, 30]
    assert any("ckpt-20.safetensors" in p["message"] for p in alerts["payload"])
    assert len(run.manifest["checkpoint_errors"]) == 2
    # on_error="raise" stops at the first bad file
    with pytest.raises(CheckpointError, match="ckpt-20"):
        analyze_checkpoints(series, probe_inputs=X, layers=["0"], on_error="raise")


def test_hf_folder_without_weights_or_config_is_named(hf_series, tmp_path):
    import shutil

    root, _ = hf_series
    for s in (0, 2, 4):
        shutil.copytree(root / f"step{s}", tmp_path / f"step{s}")
    (tmp_path / "step2" / "model.safetensors").unlink()
    (tmp_path / "step4" / "config.json").unlink()
    series = CheckpointSeries(tmp_path)
    with pytest.raises(CheckpointError, match=r"step2 \(step 2\) holds no weights file"):
        series.load(2)
    with pytest.raises(CheckpointError, match=r"step4 \(step 4\) has no config\.json"):
        series.load(4)
    # a truncated weights file
    w = tmp_path / "step0" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(step 0\)"):
        series.load(0)


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints in"):
        CheckpointSeries(tmp_path)
    with pytest.raises(FileNotFoundError, match="'directory' parameter of CheckpointSeries"):
        CheckpointSeries(tmp_path / "nope")
    _write_state_dicts(tmp_path, [1], "pt")
    (tmp_path / "step2").mkdir()
    with pytest.raises(ValueError, match="mixes checkpoint folders"):
        CheckpointSeries(tmp_path, model_factory=small_mlp)
    (tmp_path / "step2").rmdir()
    series = CheckpointSeries(tmp_path, model_factory=lambda: nn.Linear(6, 3))
    with pytest.raises(CheckpointError, match=r"step_1\.pt \(step 1\) does not fit the model"):
        series.load(1)


def test_probe_split_identical_across_checkpoints(tmp_path, monkeypatch):
    """Labels 0..n-1 make the rows each probe is trained on visible: they must be the same every time."""
    _write_state_dicts(tmp_path, [0, 1, 2, 3], "pt")
    series = CheckpointSeries(tmp_path, model_factory=small_mlp)
    n = 30
    split = probe_split(n, 0.3, seed=3)
    seen: list[np.ndarray] = []
    original = LinearProbe.fit

    def spy(self, X, y):
        seen.append(np.asarray(y).copy())
        return original(self, X, y)

    monkeypatch.setattr(LinearProbe, "fit", spy)
    X = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    analyze_checkpoints(series, probe_inputs=X, layers=["2"], targets=np.arange(n), split=split, metrics=["rankme"])
    assert len(seen) == 4
    for rows in seen:
        assert np.array_equal(rows, split.train)
    assert not set(split.train) & set(split.test)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_float32_probe_follows_a_series_loaded_in_another_dtype(tmp_path, dtype):
    """CheckpointSeries(dtype=...) loads float64 / bfloat16 models; the float32 probe is cast to match,
    and bfloat16 features reach the linear probes (numpy has no bfloat16)."""
    _write_state_dicts(tmp_path, [0, 1], "pt")
    series = CheckpointSeries(tmp_path, model_factory=small_mlp, dtype=dtype)
    n = 40
    X = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long().numpy()
    df = analyze_checkpoints(series, probe_inputs=X, layers=["0", "2"], targets=y, split=probe_split(n, 0.3, seed=1),
                             metrics=["rankme"])
    assert sorted(df["step"].unique()) == [0, 1]
    for step in (0, 1):
        model = series.load(step)
        with torch.no_grad():
            h = model[0](X.to(dtype)).double()
        want = rankme(spectrum(h))
        got = df[(df.step == step) & (df.layer == "0") & (df.metric == "rankme")]["value"].item()
        assert got == pytest.approx(want, rel=1e-9)
        acc = df[(df.step == step) & (df.layer == "0") & (df.metric == "probe_acc")]["value"].item()
        assert 0.0 <= acc <= 1.0


class _TwoViews(nn.Module):
    """Takes a list of two views, or a graph-like dict whose tensors have different first dimensions."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, views=None, *, x=None, edge_index=None):
        if views is not None:
            return self.lin(views[0]) + self.lin(views[1])
        return self.lin(x) + edge_index.shape[1]


def test_probe_inputs_of_other_shapes_reach_the_model_as_given(tmp_path):
    """A list probe stays one list argument, and a dict whose tensors differ in length is not cut."""
    for s in (0, 1):
        torch.manual_seed(s)
        torch.save(_TwoViews().state_dict(), tmp_path / f"step_{s}.pt")
    series = CheckpointSeries(tmp_path, model_factory=_TwoViews)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g)]
    graph = {"x": torch.randn(30, 6, generator=g), "edge_index": torch.randint(0, 30, (2, 90), generator=g)}
    for probe, rows in ((views, 30), (graph, 30)):
        df = analyze_checkpoints(series, probe_inputs=probe, layers=["lin"], metrics=["rankme"])
        model = series.load(1)
        with torch.no_grad():
            h = model.lin(graph["x"] if probe is graph else views[1])  # the layer's last call
        assert h.shape[0] == rows
        got = df[(df.step == 1) & (df.layer == "lin") & (df.metric == "rankme")]["value"].item()
        assert got == pytest.approx(rankme(spectrum(h)), rel=1e-9)


def test_a_namedtuple_probe_reaches_the_model_as_one(tmp_path):
    from collections import namedtuple

    Views = namedtuple("Views", ["a", "b"])
    for s in (0, 1):
        torch.manual_seed(s)
        torch.save(_TwoViews().state_dict(), tmp_path / f"step_{s}.pt")
    series = CheckpointSeries(tmp_path, model_factory=_TwoViews)
    g = torch.Generator().manual_seed(0)
    views = Views(torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g))  # one positional argument
    df = analyze_checkpoints(series, probe_inputs=(views,), layers=["lin"], metrics=["rankme"])
    with torch.no_grad():
        h = series.load(1).lin(views.b)
    got = df[(df.step == 1) & (df.metric == "rankme")]["value"].item()
    assert got == pytest.approx(rankme(spectrum(h)), rel=1e-9)
