"""A Lightning callback that runs a dimscope Tracker on the ``LightningModule`` being fitted.

::

    from dimscope.integrations.lightning import DimscopeCallback
    trainer = lightning.Trainer(callbacks=[DimscopeCallback(probe=X_probe, every=5, run="runs/exp1")])

Conventions
-----------
* **Steps are optimizer steps**: ``trainer.global_step`` after the update (1 for the first one), the
  same step axis as Lightning's own logs. The Tracker is stepped once per optimizer step, not per
  batch, so ``accumulate_grad_batches=k`` gives one measurement per k batches. With
  ``measure_at_start=True`` (default) step 0 — the initialization — is measured before training.
* **The loss** of a step is the mean training loss over its micro-batches (the ``loss`` returned by
  ``training_step``, with Lightning's division by ``accumulate_grad_batches`` undone).
  The epoch is recorded as a training scalar too.
* **The probe** goes through ``pl_module(probe)`` (your ``forward``), under ``torch.no_grad()`` in
  eval mode; a dict probe is passed as keyword arguments.
* **Where it writes**: ``run`` if given, else ``<trainer.log_dir or default_root_dir>/dimscope``.
* **Several processes**: every rank runs the callback; a
  :class:`~dimscope.integrations.distributed.DistributedTracker` splits the probe across ranks,
  all-reduces the statistics and rank 0 writes the store (tested with ``strategy="ddp_spawn"``).
  The probe forward calls the ``LightningModule`` itself, so it suits strategies that shard in place
  (DDP; FSDP2 / ``fully_shard`` through ``ModelParallelStrategy``); Lightning's FSDP1 strategy, whose
  root wrapper is outside the module, is not supported.

Only the ``lightning`` package (``lightning.pytorch``) is supported, not the older
``pytorch_lightning`` namespace. Importing this module imports Lightning; ``import dimscope`` does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from .._validation import check_int
from ..tracker import Tracker, TrackerExtension
from .sinks import Sink

__all__ = ["DimscopeCallback", "LoggerSink"]


class LoggerSink(Sink):
    """Mirror dimscope's values into the trainer's own Lightning loggers (``logger.log_metrics``).

    Keys and steps as every sink (``dimscope/<layer>/<metric>`` at ``trainer.global_step``). The
    loggers are called on the training thread (queued with :meth:`dimscope.Tracker.call_soon`, so a
    value appears at the next optimizer step, or at close), because Lightning's loggers are not
    meant to be called from the Tracker's measurement thread.
    """

    name = "Lightning logger"

    def __init__(self, loggers: Sequence[Any], *, include_training: bool = False) -> None:
        super().__init__(include_training=include_training)
        self.loggers = list(loggers)
        self._tracker: Tracker | None = None

    def setup(self, tracker: Tracker | None = None) -> None:
        self._tracker = tracker
        super().setup(tracker)

    def _emit(self, step: int, values: dict[str, float]) -> None:
        if self.failed is not None:
            return
        try:
            for lg in self.loggers:
                lg.log_metrics(values, step=step)
        except Exception as e:  # never stop training
            self._fail(e)

    def write(self, step: int, values: Any) -> None:
        values = dict(values)
        if self._tracker is None:
            self._emit(step, values)
        else:
            self._tracker.call_soon(lambda: self._emit(step, values))


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


class DimscopeCallback(Callback):
    """Measure representation geometry during ``trainer.fit``.

    Parameters
    ----------
    probe:
        The fixed probe inputs (tensor, tuple or dict of tensors); required in probe mode.
    every:
        Measure when ``trainer.global_step % every == 0``.
    layers:
        Module paths inside the ``LightningModule`` (``"model.fc1"``), globs, a list, or ``"auto"``.
    run:
        The run directory (see the module docstring for the default).
    sinks:
        :class:`~dimscope.integrations.sinks.Sink` objects (TensorBoard, MLflow, W&B, CSV), used on rank 0.
    measure_at_start:
        Measure step 0 before the first update (only when training starts from step 0 and the probe is
        measured: batch mode has no batch before training).
    log_to_loggers:
        Also mirror the values into the trainer's Lightning loggers (``trainer.loggers``) with a
        :class:`LoggerSink`.
    **tracker_kwargs:
        Passed to :class:`dimscope.Tracker` (``mode``, ``metrics``, ``conventions``, ``extensions``, ...).

    Attributes
    ----------
    tracker:
        The Tracker of the current fit (None before ``fit`` and after it ends).
    run_dir:
        Where the run was written.
    """

    def __init__(
        self,
        probe: Any = None,
        *,
        every: int = 5,
        layers: Any = "auto",
        run: str | os.PathLike[str] | None = None,
        sinks: Sequence[TrackerExtension] = (),
        measure_at_start: bool = True,
        log_to_loggers: bool = False,
        **tracker_kwargs: Any,
    ) -> None:
        super().__init__()
        self.log_to_loggers = bool(log_to_loggers)
        self.probe = probe
        self.every = check_int(every, "every", min_value=1, owner="DimscopeCallback")
        self.layers = layers
        self.run = run
        self.sinks = list(sinks)
        self.measure_at_start = bool(measure_at_start)
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self.run_dir: Path | None = None
        self._last_step = -1
        self._loss_sum: torch.Tensor | None = None
        self._n_batches = 0

    # -- set-up -------------------------------------------------------------------------------------
    def _run_dir(self, trainer: Trainer) -> Path:
        if self.run is not None:
            return Path(self.run)
        return Path(trainer.log_dir or trainer.default_root_dir) / "dimscope"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run_dir = self._run_dir(trainer)
        kwargs = dict(self.tracker_kwargs)
        extensions = list(kwargs.pop("extensions", ())) + self.sinks
        if self.log_to_loggers and trainer.loggers:
            extensions.append(LoggerSink(trainer.loggers))
        kwargs.update(every=self.every, layers=self.layers, run=str(self.run_dir), extensions=extensions)
        from .distributed import tracker_for

        self.tracker = tracker_for(pl_module, self.probe, trainer.world_size, **kwargs)
        self._last_step = trainer.global_step
        self._loss_sum, self._n_batches = None, 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tracker is not None and self.measure_at_start and trainer.global_step == 0 and "probe" in self.tracker.modes:
            self.tracker.step(0, epoch=trainer.current_epoch)

    # -- the loop -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            loss = loss.to(torch.promote_types(loss.dtype, torch.float32))  # a bf16 sum rounds; float64 stays
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._n_batches += 1
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        scalars: dict[str, Any] = {"epoch": float(trainer.current_epoch)}
        if self._loss_sum is not None:
            # automatic optimization: Lightning divided each micro-batch loss by accumulate_grad_batches
            # (also in a shorter last window of an epoch); undo it, then average over the micro-batches.
            # A tensor: the Tracker reads it with the others at its next write, not now (no GPU wait per step)
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            scalars["loss"] = self._loss_sum * (scale / max(self._n_batches, 1))
        self._loss_sum, self._n_batches = None, 0
        self.tracker.step(step, **scalars)

    # -- ending -------------------------------------------------------------------------------------
    def _close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()
