"""Hugging Face Trainer: the callback measures on optimizer steps, takes the loss from the logs, feeds sinks."""

from __future__ import annotations


import pytest
import torch

import dimscope
from dimscope.capture import count_hooks

from _integration_helpers import read_mlflow_files, read_wandb_offline, store_values

pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dimscope.integrations.huggingface import DimscopeCallback  # noqa: E402

LAYERS = ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=48, length=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 40, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 20).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **kw,
    )


def _probe():
    ids = torch.randint(1, 40, (6, 8), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_hf_trainer_callback_store_mlflow_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from dimscope.integrations.sinks import MLflowSink, WandbSink

    mlflow_sink = MLflowSink((tmp_path / "mlruns").as_uri(), experiment="hf")
    wandb_sink = WandbSink(dir=tmp_path / "wandb", project="hf")
    model = _model()
    probe = _probe()
    cb = DimscopeCallback(probe=probe, every=2, layers=LAYERS, sinks=[mlflow_sink, wandb_sink])
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_Data(), callbacks=[cb])
    trainer.train()
    assert cb.tracker is None and count_hooks(model) == 0
    assert cb.run_dir == tmp_path / "out" / "dimscope"

    run = dimscope.open_run(cb.run_dir)
    sr = run.metric("stable_rank", LAYERS[1])
    assert sr.index.tolist() == [0, 2, 4, 6]  # optimizer steps (2 micro-batches each), plus the initialization
    # the loss comes from the Trainer's logs, at the steps it was logged
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert run.training("loss").to_dict() == pytest.approx(logged, rel=1e-12)
    assert set(run.training("learning_rate").index) == set(logged)
    assert "train_runtime" not in set(run.scalars(space="training")["metric"])

    # step 6 is the final model on the probe: tokens as samples (6 x 8 rows, 16 features)
    with torch.no_grad(), dimscope.capture(model.eval(), LAYERS) as cap:
        model(**probe)
    spec = dimscope.spectrum(cap.outputs[LAYERS[1]].reshape(-1, 16))
    assert spec.n_samples == 48
    assert sr[6] == pytest.approx(dimscope.stable_rank(spec), rel=1e-9)

    expected = store_values(cb.run_dir)
    got_mlflow = read_mlflow_files(tmp_path / "mlruns", mlflow_sink.run_id)
    assert set(got_mlflow) == set(expected)
    got_wandb = {}
    for row in read_wandb_offline(wandb_sink.run_dir):
        got_wandb.update({(row["dimscope/step"], k): v for k, v in row.items() if k.startswith("dimscope/") and k != "dimscope/step"})
    assert set(got_wandb) == set(expected)
    for k, v in expected.items():
        assert got_mlflow[k] == pytest.approx(v, rel=0, nan_ok=True)
        assert got_wandb[k] == pytest.approx(v, rel=0, nan_ok=True)


def test_hf_callback_every_and_missing_model(tmp_path):
    with pytest.raises(TypeError, match="'every' parameter of DimscopeCallback must be an int >= 1. Got 2.5"):
        DimscopeCallback(probe=_probe(), every=2.5)
    cb = DimscopeCallback(probe=_probe(), every=3, layers=LAYERS, run=tmp_path / "r", measure_at_start=False)
    with pytest.raises(ValueError, match="needs the trainer's model"):
        cb.on_train_begin(_args(tmp_path), transformers.TrainerState(), transformers.TrainerControl(), model=None)


def _ddp_worker(rank: int, world: int, tmp: str, port: int) -> None:
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = _model()
    cb = DimscopeCallback(probe=_probe(), every=2, layers=LAYERS, run=f"{tmp}/run", max_rows=None)
    trainer = transformers.Trainer(model=model, args=_args(Path(tmp)), train_dataset=_Data(), callbacks=[cb])
    assert torch.distributed.is_initialized() and trainer.args.world_size == 2
    trainer.train()
    if rank == 0:
        torch.save(model.state_dict(), f"{tmp}/final.pt")


@pytest.mark.slow
def test_hf_trainer_ddp_two_cpu_processes(tmp_path):
    """Trainer under torch.distributed (2 CPU processes, gloo): the callback uses the DistributedTracker."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2, join=True)
    run = dimscope.open_run(tmp_path / "run")
    assert run.manifest["distributed"]["world_size"] == 2 and run.manifest["distributed"]["backend"] == "gloo"
    sr = run.metric("stable_rank", LAYERS[1])
    assert sr.index.tolist() == [0, 2, 4, 6]
    model = _model()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    with torch.no_grad(), dimscope.capture(model.eval(), LAYERS) as cap:
        model(**_probe())
    for layer in LAYERS:
        spec = dimscope.spectrum(cap.outputs[layer].reshape(-1, 16))
        assert run.metric("stable_rank", layer)[6] == pytest.approx(dimscope.stable_rank(spec), rel=1e-6)
        assert run.metric("participation_ratio", layer)[6] == pytest.approx(dimscope.participation_ratio(spec), rel=1e-6)
