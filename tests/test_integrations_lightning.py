"""Lightning: the callback steps on optimizer steps (gradient accumulation) and feeds the store and sinks."""

from __future__ import annotations

import pytest
import torch

import dimscope
from dimscope.capture import count_hooks

from _integration_helpers import mlp, read_csv_sink, read_tensorboard, store_values

pytestmark = pytest.mark.integration

L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from dimscope.integrations.lightning import DimscopeCallback  # noqa: E402
from dimscope.integrations.sinks import CSVSink, TensorBoardSink  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp(seed=0)
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, cb, max_steps=6, **kw):
    return L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                     default_root_dir=str(tmp_path), **kw)


def test_lightning_callback_gradient_accumulation_store_and_sinks(tmp_path):
    module = Tiny()
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    cb = DimscopeCallback(probe=probe, every=2, layers=["net.0", "net.2"], run=tmp_path / "run",
                          sinks=[TensorBoardSink(tmp_path / "tb"), CSVSink(tmp_path / "m.csv")])
    _trainer(tmp_path, cb).fit(module, _loader())
    assert cb.tracker is None and count_hooks(module) == 0

    run = dimscope.open_run(tmp_path / "run")
    # 12 batches, 2 per optimizer step: steps 1..6; measured at 0 (initialization), 2, 4, 6
    sr = run.metric("stable_rank", "net.2")
    assert sr.index.tolist() == [0, 2, 4, 6]
    loss = run.training("loss")
    assert loss.index.tolist() == [1, 2, 3, 4, 5, 6]  # one value per optimizer step, not per batch
    want = [(module.losses[2 * k] + module.losses[2 * k + 1]) / 2 for k in range(6)]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)
    assert run.training("epoch").to_dict() == {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1}  # 4 optimizer steps per epoch

    # the values at step 6 are those of the final model on the probe
    with torch.no_grad(), dimscope.capture(module.eval(), ["net.2"]) as cap:
        module(probe)
    assert sr[6] == pytest.approx(dimscope.stable_rank(dimscope.spectrum(cap.outputs["net.2"])), rel=1e-9)

    expected = store_values(tmp_path / "run")
    tb, csv_values = read_tensorboard(tmp_path / "tb"), read_csv_sink(tmp_path / "m.csv")
    assert set(tb) == set(expected) == set(csv_values)
    for k, v in expected.items():
        assert tb[k] == pytest.approx(v, rel=1e-6, nan_ok=True)
        assert csv_values[k] == pytest.approx(v, rel=0, nan_ok=True)


def test_lightning_callback_default_run_dir_and_bad_every(tmp_path):
    with pytest.raises(ValueError, match="'every' parameter of DimscopeCallback must be an int >= 1. Got 0"):
        DimscopeCallback(probe=torch.randn(8, 12), every=0)
    module = Tiny()
    cb = DimscopeCallback(probe=torch.randn(16, 12), every=3, measure_at_start=False)
    _trainer(tmp_path, cb).fit(module, _loader())
    assert cb.run_dir == tmp_path / "dimscope"
    run = dimscope.open_run(cb.run_dir)
    assert run.metric("participation_ratio", "net.4").index.tolist() == [3, 6]
    assert run.layers == ["net.0", "net.2", "net.4"]


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_lightning_true_precision_casts_the_probe_like_the_model(tmp_path, precision):
    """Lightning converts the module and the training batches, not the callback's float32 probe:
    the probe is cast to the module's dtype (it failed with 'mat1 and mat2 must have the same dtype')."""
    module = Tiny()
    probe = torch.randn(24, 12, generator=torch.Generator().manual_seed(2))
    cb = DimscopeCallback(probe=probe, every=2, layers=["net.0"], run=tmp_path / "run", measure_at_start=False)
    _trainer(tmp_path, cb, max_steps=2, precision=precision).fit(module, _loader())
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    assert module.net[0].weight.dtype == dtype
    with torch.no_grad():
        h = module.net[0](probe.to(dtype)).double()  # the weights after step 2, where it was measured
    sr = dimscope.open_run(tmp_path / "run").metric("stable_rank", "net.0")
    s = dimscope.spectrum(h)
    assert sr.index.tolist() == [2] and sr[2] == pytest.approx(s.values.sum() / s.values[0], rel=1e-9)
    # the loss in the module's precision: a float64 loss not rounded to float32 (rel 6e-8), a bf16 loss summed without rounding
    loss = dimscope.open_run(tmp_path / "run").training("loss")
    want = [(module.losses[2 * k] + module.losses[2 * k + 1]) / 2 for k in range(2)]
    assert loss.tolist() == pytest.approx(want, rel=1e-13 if dtype == torch.float64 else 1e-7)


def test_lightning_loss_of_a_short_accumulation_window(tmp_path):
    """7 batches per epoch, 2 per step: the 4th optimizer step has one batch; its loss is that batch's loss."""
    module = Tiny()
    cb = DimscopeCallback(probe=torch.randn(16, 12), every=4, layers=["net.2"], run=tmp_path / "run")
    _trainer(tmp_path, cb, max_steps=5).fit(module, _loader(56))
    loss = dimscope.open_run(tmp_path / "run").training("loss")
    assert loss.index.tolist() == [1, 2, 3, 4, 5]
    assert loss[3] == pytest.approx((module.losses[4] + module.losses[5]) / 2, rel=1e-6)
    assert loss[4] == pytest.approx(module.losses[6], rel=1e-6)
    assert loss[5] == pytest.approx((module.losses[7] + module.losses[8]) / 2, rel=1e-6)


def test_lightning_callback_mirrors_into_the_trainers_loggers(tmp_path):
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    module = Tiny()
    logger = CSVLogger(str(tmp_path), name="lg", version=0)
    cb = DimscopeCallback(probe=torch.randn(16, 12), every=2, layers=["net.2"], run=tmp_path / "run", log_to_loggers=True)
    L.Trainer(max_steps=4, callbacks=[cb], logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=1).fit(module, _loader())
    df = pd.read_csv(tmp_path / "lg" / "version_0" / "metrics.csv")
    col = "dimscope/net.2/stable_rank"
    got = df.dropna(subset=[col]).set_index("step")[col].to_dict()
    want = dimscope.open_run(tmp_path / "run").metric("stable_rank", "net.2").to_dict()
    assert sorted(got) == [0, 2, 4] == sorted(want)
    assert got == pytest.approx(want, rel=1e-12)


class Exploding(Tiny):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("boom at step 3")
        return super().training_step(batch, batch_idx)


def test_lightning_callback_closes_and_keeps_measurements_when_training_raises(tmp_path):
    module = Exploding()
    cb = DimscopeCallback(probe=torch.randn(16, 12), every=1, layers=["net.2"], run=tmp_path / "run", mode=("probe", "batch"))
    with pytest.raises(RuntimeError, match="boom at step 3"):
        _trainer(tmp_path, cb).fit(module, _loader())
    assert cb.tracker is None and count_hooks(module) == 0  # the batch-mode hooks are gone too
    run = dimscope.open_run(tmp_path / "run")
    assert run.metric("stable_rank", "net.2").index.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_lightning_ddp_spawn_two_cpu_processes(tmp_path):
    """strategy='ddp_spawn' on 2 CPU processes: the callback switches to the DistributedTracker."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available")
    module = Tiny()
    probe = torch.randn(41, 12, generator=torch.Generator().manual_seed(1))
    cb = DimscopeCallback(probe=probe, every=2, layers=["net.0", "net.2"], run=tmp_path / "run", max_rows=None)
    trainer = L.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp_spawn",
                        default_root_dir=str(tmp_path))
    trainer.fit(module, _loader())
    run = dimscope.open_run(tmp_path / "run")
    assert run.manifest["distributed"]["world_size"] == 2
    sr = run.metric("stable_rank", "net.2")
    assert sr.index.tolist() == [0, 2, 4]
    # ddp_spawn hands rank 0's final weights back to this process: one process on the whole probe agrees
    with torch.no_grad(), dimscope.capture(module.eval(), ["net.0", "net.2"]) as cap:
        module(probe)
    for layer in ("net.0", "net.2"):
        spec = dimscope.spectrum(cap.outputs[layer])
        assert run.metric("stable_rank", layer)[4] == pytest.approx(dimscope.stable_rank(spec), rel=1e-6)
        assert run.metric("effective_rank", layer)[4] == pytest.approx(dimscope.effective_rank(spec), rel=1e-6)
        assert run.spectra(layer)[4].n_samples == 41
