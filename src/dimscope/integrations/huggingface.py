"""A Hugging Face ``TrainerCallback`` that runs a dimscope Tracker on the trainer's model.

::

    from dimscope.integrations.huggingface import DimscopeCallback
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[DimscopeCallback(probe=tokenizer(texts, return_tensors="pt"), every=5)])

Conventions
-----------
* **Steps are optimizer steps**: ``state.global_step`` after the update (1 for the first one), the
  step axis of the Trainer's own logs. ``on_step_end`` runs once per optimizer step, so
  ``gradient_accumulation_steps`` is handled by the Trainer. Step 0 (the initialization) is measured
  at ``on_train_begin`` when training starts from step 0 (``measure_at_start``).
* **Hooks go on the trainer's model** (the ``model`` the Trainer passes to callbacks); layer names are
  its module paths (``"bert.encoder.layer.3.output"``).
* **The loss and the other logged numbers** (``loss``, ``grad_norm``, ``learning_rate``, ``epoch``,
  ``eval_*``) are taken from the Trainer's logs (``on_log``) and stored as training scalars at the
  step they were logged, so their frequency is ``logging_steps``; the loss is the Trainer's mean
  since the previous log. Run statistics (``*_runtime``, ``*_per_second``, ``total_flos``,
  ``train_loss``) are not stored.
* **The probe** is passed to ``model(**probe)`` when it is a dict (e.g. a tokenizer's
  ``BatchEncoding`` as a dict: ``dict(tokenizer(...))``), else ``model(probe)``.
* **Where it writes**: ``run`` if given, else ``<args.output_dir>/dimscope``.
* **Several processes** (``torchrun`` / ``accelerate launch`` with DDP): every rank runs the
  callback; a :class:`~dimscope.integrations.distributed.DistributedTracker` splits the probe,
  all-reduces the statistics, and rank 0 writes.

Importing this module imports ``transformers``; ``import dimscope`` does not. The Trainer has no
hook for a training exception: the Tracker then closes (and commits) at interpreter exit.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .._validation import check_int
from ..tracker import Tracker, TrackerExtension

__all__ = ["DimscopeCallback"]

_SKIP_SUFFIXES = ("_runtime", "_per_second")
_SKIP_KEYS = {"total_flos", "train_loss"}


def _loggable(logs: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if k in _SKIP_KEYS or k.endswith(_SKIP_SUFFIXES):
            continue
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[k] = float(v.item())
    return out


class DimscopeCallback(TrainerCallback):
    """Measure representation geometry during ``Trainer.train``.

    Parameters
    ----------
    probe:
        The fixed probe inputs (tensor, tuple or dict of tensors); required in probe mode.
    every:
        Measure when ``state.global_step % every == 0``.
    layers:
        Module paths of the model, globs, a list, or ``"auto"`` (every Linear / conv layer).
    run:
        The run directory (see the module docstring for the default).
    sinks:
        :class:`~dimscope.integrations.sinks.Sink` objects (TensorBoard, MLflow, W&B, CSV), used on rank 0.
    measure_at_start:
        Measure step 0 before the first update (only when training starts from step 0 and the probe is
        measured: batch mode has no batch before training).
    **tracker_kwargs:
        Passed to :class:`dimscope.Tracker`.
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
        **tracker_kwargs: Any,
    ) -> None:
        self.probe = dict(probe) if isinstance(probe, Mapping) else probe
        self.every = check_int(every, "every", min_value=1, owner="DimscopeCallback")
        self.layers = layers
        self.run = run
        self.sinks = list(sinks)
        self.measure_at_start = bool(measure_at_start)
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Tracker | None = None
        self.run_dir: Path | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("DimscopeCallback needs the trainer's model; the Trainer passed model=None.")
        self.run_dir = Path(self.run) if self.run is not None else Path(args.output_dir) / "dimscope"
        kw = dict(self.tracker_kwargs)
        extensions = list(kw.pop("extensions", ())) + self.sinks
        kw.update(every=self.every, layers=self.layers, run=str(self.run_dir), extensions=extensions)
        from .distributed import tracker_for

        self.tracker = tracker_for(model, self.probe, getattr(args, "world_size", 1), **kw)
        if self.measure_at_start and state.global_step == 0 and "probe" in self.tracker.modes:
            self.tracker.step(0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.step(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        tracker = self.tracker
        if tracker is None or tracker.store is None or not logs:
            return
        now, step = time.time(), int(state.global_step)
        rows = [(step, now, "", k, v, "training", "") for k, v in _loggable(logs).items()]
        if rows:
            tracker.store.add_scalars(rows)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
