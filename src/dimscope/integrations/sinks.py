"""Mirror the Tracker's metrics to TensorBoard, MLflow, Weights & Biases or a CSV file.

A sink is a :class:`~dimscope.TrackerExtension`: pass it in ``extensions=[...]`` (or ``sinks=[...]`` of
the Lightning / Hugging Face callbacks)::

    from dimscope.integrations.sinks import TensorBoardSink
    tracker = dimscope.Tracker(model, probe=X, run="runs/a", extensions=[TensorBoardSink("runs/a/tb")])

Conventions
-----------
* **Keys** are ``dimscope/<layer>/<metric>``: ``dimscope/fc1/stable_rank`` for an activation metric
  (the Tracker's primary convention, e.g. ``probe/centered``), ``dimscope/fc1/weight/stable_rank``
  for the weight spectrum. Training scalars (``loss``, ``grad_norm``, ...) are mirrored as
  ``dimscope/<name>`` only with ``include_training=True`` (the trainer usually logs them already).
* **Steps** are the Tracker's optimizer steps.
* **The run store stays the source of truth.** A sink only copies what the Tracker measured, on the
  Tracker's measurement thread. When a sink raises, it warns once, is switched off for the rest of
  the run, and training goes on; the run store keeps every value.
* Each package is imported when its sink is created (a missing package fails there, early), never
  by ``import dimscope``. The backend (writer, run, file) is opened when the sink is attached to a
  Tracker (:meth:`Sink.setup`), so under torch.distributed only rank 0, which runs the extensions,
  opens anything; it is closed with the Tracker. A sink can be attached again (a second ``fit``):
  it opens a fresh writer / run, or appends to the CSV file.
"""

from __future__ import annotations

import csv
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._validation import check_choice
from ..tracker import Tracker, TrackerExtension

__all__ = ["Sink", "scalar_key", "TensorBoardSink", "MLflowSink", "WandbSink", "CSVSink"]

PREFIX = "dimscope"


def scalar_key(layer: str, metric: str) -> str:
    """The exported key of one value: ``dimscope/<layer>/<metric>`` (``dimscope/<metric>`` when layer is '')."""
    return "/".join(p for p in (PREFIX, layer, metric) if p)


def _require(module: str, extra: str, owner: str) -> None:
    """Import ``module`` now, so that a missing package fails where the sink is created."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{owner} needs the '{module}' package: pip install 'dimscope[{extra}]'.") from e


class Sink(TrackerExtension):
    """Base class: turns the Tracker's values into ``{key: value}`` at a step and calls :meth:`write`.

    Subclasses implement :meth:`_open`, :meth:`write` and :meth:`_close`. Errors in any of them are
    caught: the first one is reported as a ``RuntimeWarning`` and the sink is switched off until it
    is attached again (``failed`` holds the exception); training and the run store are not affected.
    """

    name = "sink"

    def __init__(self, *, include_training: bool = False) -> None:
        self.include_training = bool(include_training)
        self.failed: BaseException | None = None
        self.opened = False
        self.n_written = 0

    # -- what subclasses implement ----------------------------------------------------------------
    def _open(self) -> None:
        """Open the backend (a writer, a run, a file)."""

    def write(self, step: int, values: Mapping[str, float]) -> None:  # pragma: no cover - abstract
        """Write ``{key: value}`` at optimizer step ``step``."""
        raise NotImplementedError

    def _close(self) -> None:
        """Flush and release the backend."""

    # -- the extension side -----------------------------------------------------------------------
    def setup(self, tracker: Tracker | None = None) -> None:
        """Open the backend (called when attached to a Tracker); a failure warns and switches the sink off."""
        self.failed = None
        try:
            self._open()
            self.opened = True
        except Exception as e:  # a sink must never stop training
            self._fail(e)

    def keyed(self, values: Mapping[tuple[str, str], float]) -> dict[str, float]:
        """The Tracker's ``(layer, metric) -> value`` as ``{dimscope/<layer>/<metric>: value}``."""
        out = {}
        for (layer, metric), v in values.items():
            if not layer and not self.include_training:
                continue
            out[scalar_key(layer, metric)] = float(v)
        return out

    def on_metrics(self, tracker: Tracker, step: int, values: dict[tuple[str, str], float]) -> None:
        self.log(step, self.keyed(values))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` at ``step`` (opening the backend if needed) unless the sink failed; never raises."""
        if not self.opened and self.failed is None:
            self.setup()
        if self.failed is not None or not values:
            return
        try:
            self.write(int(step), values)
            self.n_written += 1
        except Exception as e:  # a sink must never stop training
            self._fail(e)

    def close(self, tracker: Tracker | None = None) -> None:
        """Flush and release the backend (the Tracker calls it at close)."""
        if not self.opened:
            return
        self.opened = False
        try:
            self._close()
        except Exception as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if self.failed is None:
            self.failed = e
            warnings.warn(
                f"dimscope: the {self.name} sink failed ({e!r}); mirroring to it is switched off for the rest "
                "of this run. Training goes on and the run store keeps every value.",
                RuntimeWarning,
                stacklevel=2,
            )


class TensorBoardSink(Sink):
    """Scalars to TensorBoard event files with ``torch.utils.tensorboard.SummaryWriter``.

    Pass ``log_dir`` (a new writer, closed with the Tracker) or an existing ``writer`` (shared with
    your own logging, flushed but not closed). Needs the ``tensorboard`` package
    (``pip install dimscope[tensorboard]``). TensorBoard stores values as float32.
    """

    name = "TensorBoard"

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None, include_training: bool = False) -> None:
        super().__init__(include_training=include_training)
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of 'log_dir' or 'writer'. Got "
                             f"log_dir={log_dir!r}, writer={writer!r}.")
        _require("tensorboard", "tensorboard", "TensorBoardSink")
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._owns = writer is None
        self.writer = writer

    def _open(self) -> None:
        if self._owns:
            self.writer = self._writer_cls(log_dir=str(self.log_dir))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)

    def _close(self) -> None:
        if self._owns:
            self.writer.close()
        else:
            self.writer.flush()


class MLflowSink(Sink):
    """Metrics to an MLflow run, through ``MlflowClient.log_batch``.

    The run is, in order: ``run_id`` if given; else the run active when the sink is attached
    (``mlflow.start_run()``, a trainer's MLflow integration) when no ``tracking_uri`` is given; else a new run in ``experiment``
    (created if needed) on ``tracking_uri`` (default: MLflow's own default), ended at close.

    Local stores: ``tracking_uri="sqlite:///mlflow.db"`` (MLflow's recommended local backend) or a
    ``file:`` directory — MLflow 3 refuses the file store unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    Metric timestamps are the wall time of the write.
    """

    name = "MLflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment: str = "dimscope",
        run_id: str | None = None,
        run_name: str | None = None,
        include_training: bool = False,
    ) -> None:
        super().__init__(include_training=include_training)
        _require("mlflow", "mlflow", "MLflowSink")

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.given_run_id = run_id
        self.run_name = run_name
        self.run_id: str | None = run_id
        self.client: Any = None
        self._owns = False

    def _open(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._owns = False
        active = mlflow.active_run() if self.tracking_uri is None and self.given_run_id is None else None
        uri = self.tracking_uri if self.tracking_uri is not None else mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if self.given_run_id is not None:
            self.run_id = self.given_run_id
        elif active is not None:
            self.run_id = active.info.run_id
        else:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
            self._owns = True

    def write(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def _close(self) -> None:
        if self._owns:
            self.client.set_terminated(self.run_id)


class WandbSink(Sink):
    """Metrics to a Weights & Biases run, offline by default.

    Uses ``run`` if given (with Lightning's ``WandbLogger``: ``WandbSink(run=logger.experiment)``),
    else the active ``wandb.run`` when the sink is attached to the Tracker, else starts one with
    ``wandb.init(mode=mode, dir=dir, project=project, **init_kwargs)`` and finishes it at close.
    ``mode`` defaults to ``"offline"`` (nothing leaves the machine; ``wandb sync`` uploads later),
    whatever ``WANDB_MODE`` says; pass ``mode="online"`` to stream.

    The optimizer step is logged as ``dimscope/step`` and declared the step metric of
    ``dimscope/*`` (``define_metric``), so dimscope never fights the trainer over W&B's own step
    counter, which must only increase.
    """

    name = "W&B"

    def __init__(
        self,
        *,
        run: Any = None,
        project: str = "dimscope",
        dir: str | os.PathLike[str] | None = None,
        mode: str = "offline",
        include_training: bool = False,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(include_training=include_training)
        _require("wandb", "wandb", "WandbSink")
        check_choice(mode, "mode", ("offline", "online", "disabled"), owner="WandbSink")

        self.given_run = run
        self.project = project
        self.dir = None if dir is None else Path(dir)
        self.mode = mode
        self.init_kwargs = init_kwargs
        self.run: Any = None
        self.run_dir: Path | None = None
        self._owns = False

    def _open(self) -> None:
        import wandb

        self._owns = False
        run = self.given_run if self.given_run is not None else wandb.run
        if run is None:
            kw = dict(self.init_kwargs)
            settings = kw.pop("settings", None) or wandb.Settings(silent=True, console="off")
            if self.dir is not None:
                self.dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(mode=self.mode, dir=None if self.dir is None else str(self.dir), project=self.project,
                             settings=settings, **kw)
            self._owns = True
        self.run = run
        self.run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.define_metric(f"{PREFIX}/step")
        run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({f"{PREFIX}/step": step, **values})

    def _close(self) -> None:
        if self._owns:
            self.run.finish()


class CSVSink(Sink):
    """Rows ``step,wall_time,key,value`` appended to a CSV file (long format, flushed at every write).

    Non-finite values are written as ``nan`` / ``inf``. An existing file is appended to.
    """

    name = "CSV"

    def __init__(self, path: str | os.PathLike[str], *, include_training: bool = False) -> None:
        super().__init__(include_training=include_training)
        self.path = Path(path)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(["step", "wall_time", "key", "value"])
            self._fh.flush()

    def write(self, step: int, values: Mapping[str, float]) -> None:
        now = time.time()
        self._writer.writerows([step, f"{now:.3f}", k, repr(v) if math.isfinite(v) else str(v)] for k, v in values.items())
        self._fh.flush()

    def _close(self) -> None:
        self._fh.close()
