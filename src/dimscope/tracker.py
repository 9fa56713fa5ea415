"""The Tracker: every k optimizer steps, each chosen layer's representation becomes a spectrum.

Three lines in a training loop::

    tracker = dimscope.Tracker(model, probe=X_probe, every=5, layers=["fc1", "fc2"], run="runs/demo")
    tracker.step(step, loss=loss.item())      # after optimizer.step(), every iteration
    tracker.close()                            # or: with dimscope.Tracker(...) as tracker:

Modes
-----
``"probe"`` (default): at each measurement the fixed probe inputs go through the model under
``torch.no_grad()`` in eval mode; every module's train/eval flag and the grad mode are restored.
Hooks exist only during that forward. ``"batch"``: the activations of the most recent training
forward (a forward run with grad enabled) are measured, as ndtracker does; hooks live from the
Tracker's construction to :meth:`Tracker.close`. ``("probe", "batch")`` records both.

Where the work happens
----------------------
The training thread runs the probe forward and copies the features. The eigendecompositions,
metrics and SQLite writes then run in one of three places (``background``):

* ``"batched"`` (the default when torch already uses every CPU core): measurements are buffered
  and, at each commit (every ``commit_every`` measurements or ``commit_seconds``), their spectra
  are computed together by :func:`~dimscope.spectrum.batch_spectra` while training waits (float64
  Gram matrices by torch on training's threads, same-size eigendecompositions stacked and, when
  large, split over those threads) and written with one commit. A thread running beside training
  would stall torch's OpenMP workers, which spin on the other cores between ops; a burst at the
  commit does not. That holds beside a GPU's training too (benchmarks/results/overhead_h200.txt).
* ``True`` (the default when torch leaves CPU cores free): one background
  thread with a bounded queue, so a slow measurement applies back-pressure instead of growing memory.
* ``False``: everything inline at the measured step, and :meth:`Tracker.step` returns the values.

:meth:`Tracker.close` (and the context manager's exit, also on an exception) computes and commits
every buffered or queued measurement; a SIGKILL loses at most the measurements since the last commit.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import platform
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._validation import check_bool, check_choice, check_float, check_int
from .capture import LayerSelection, as_token_mask, capture, iter_layer_weights, positional_index, resolve_layers, to_features
from .metrics import DEFINITIONS, MOMENT_METRICS, check_metric_spec, compute_metrics_batch, metric_params, moment_metrics
from .spectrum import Moments, NonFiniteError, Spectrum, Workspace, _one_blas_thread, batch_spectra, spectrum, weight_spectrum
from .store import RunStore

__all__ = ["Tracker", "TrackerExtension", "probe_forward"]

# (step, wall time, layer, metric, value, space, convention); a training scalar's value may still be
# a 0-d tensor (see _scalar), read at the next write
_Row = tuple[int, float, str, str, Any, str, str]

# A batched flush computes at most this many bytes of buffered features at once by default.
_MAX_PENDING_BYTES = 256 * 2**20

# Spectra (or moments) of a flush: (id of the tensor, centered; None for a weight) -> result.
_Key = tuple[int, bool | None]
_Spectra = dict[_Key, Any]  # a Spectrum, Moments, or the exception that stopped it
# ... and their metric values.
_Results = tuple[_Spectra, dict[_Key, dict[str, float]]]


class _Measurement:
    """What one measurement captured on the training thread, waiting for its spectra."""

    __slots__ = ("step", "now", "feats", "weights", "rows", "jobs", "full")

    def __init__(self, step: int, now: float, feats: dict[str, dict[str, torch.Tensor]], weights: dict[str, torch.Tensor],
                 rows: list[_Row], jobs: list[Callable[[], None]], full: bool = True) -> None:
        self.step, self.now, self.feats, self.weights, self.rows, self.jobs = step, now, feats, weights, rows, jobs
        self.full = full  # the whole spectrum and every metric; else the moment metrics only

    def tensors(self) -> Iterable[torch.Tensor]:
        for layer_feats in self.feats.values():
            yield from layer_feats.values()
        yield from self.weights.values()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class TrackerExtension:
    """Base class for things that measure alongside the Tracker (alerts, ε-rank, probes...).

    Every method is optional. ``on_step`` and ``on_features`` run on the training thread at the
    measured step; a callable returned by ``on_features`` and ``on_metrics`` run where the spectra
    are computed: on the measurement thread (``background=True``), inline (``False``), or on the
    training thread at the next commit (``"batched"``), in the order of the measurements.
    Extensions write through ``tracker.store`` (thread-safe).
    """

    name = "extension"

    def setup(self, tracker: Tracker) -> None:  # noqa: D102
        pass

    def on_step(self, tracker: Tracker, step: int, measuring: bool) -> None:  # noqa: D102
        pass

    def on_features(self, tracker: Tracker, step: int, features: dict[str, torch.Tensor]) -> Callable[[], None] | None:  # noqa: D102
        return None

    def on_metrics(self, tracker: Tracker, step: int, values: dict[tuple[str, str], float]) -> None:  # noqa: D102
        pass

    def close(self, tracker: Tracker) -> None:  # noqa: D102
        pass

    #: True for an extension that measures the whole probe in one process (its own forward passes or
    #: spectra): it cannot run beside a DistributedTracker whose ranks each hold a share of the probe.
    needs_whole_probe = False
    #: True for an extension that runs the model's forward itself (on rank 0 only, beside a
    #: DistributedTracker): refused there when the parameters are sharded.
    runs_own_forward = False


_EXTENSION_METHODS = ("setup", "on_step", "on_features", "on_metrics", "close")


def _probe_tensors(probe: Any) -> list[torch.Tensor]:
    if isinstance(probe, torch.Tensor):
        return [probe]
    if isinstance(probe, Mapping):
        return [v for v in probe.values() if isinstance(v, torch.Tensor)]
    if isinstance(probe, (tuple, list)):
        return [v for v in probe if isinstance(v, torch.Tensor)]
    return []


def _probe_len(probe: Any) -> int:
    ts = _probe_tensors(probe)
    if not ts:
        raise TypeError(
            "The 'probe' parameter of Tracker must be a tensor, a tuple of tensors (positional inputs) "
            f"or a dict of tensors (keyword inputs). Got {type(probe).__name__} instead."
        )
    if ts[0].ndim == 0:
        raise ValueError("The 'probe' parameter of Tracker must have a batch dimension. Got a scalar tensor.")
    return int(ts[0].shape[0])


def _probe_hash(probe: Any) -> str:
    h = hashlib.sha256()
    for t in _probe_tensors(probe):
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        # the raw bytes (numpy has no bfloat16 or float8)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def input_placement(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Where the model's inputs go: the device of its first parameter, and the dtype of its first
    floating-point parameter (the dtype a probe is cast to when the forward fails as given, see
    :func:`call_on_probe`; under autocast the parameters stay float32)."""
    device: torch.device | None = None
    for p in model.parameters():
        if device is None:
            device = p.device
        if p.is_floating_point():  # float8 weights (quantised storage) say nothing of what the inputs are
            return device, p.dtype if p.dtype in _INPUT_DTYPES else None
    return device, None


def _slice_probe(probe: Any, a: int, b: int) -> Any:
    """Rows a:b of every tensor of the probe (:func:`call_on_probe` places them)."""
    def mv(t: Any) -> Any:
        return t[a:b] if isinstance(t, torch.Tensor) else t

    if isinstance(probe, torch.Tensor):
        return mv(probe)
    if isinstance(probe, Mapping):
        return {k: mv(v) for k, v in probe.items()}
    return tuple(mv(v) for v in probe)


def place_inputs(inputs: Any, device: torch.device | None, dtype: torch.dtype | None = None) -> Any:
    """``inputs`` with every tensor (also inside dicts, tuples and lists) moved to ``device`` and,
    with ``dtype``, every floating-point one cast to it; anything else as it is."""
    if isinstance(inputs, torch.Tensor):
        kw: dict[str, Any] = {} if device is None else {"device": device}
        if dtype is not None and inputs.is_floating_point():
            kw["dtype"] = dtype
        return inputs.to(**kw) if kw else inputs
    if isinstance(inputs, Mapping):
        return {k: place_inputs(v, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        items = [place_inputs(v, device, dtype) for v in inputs]
        if isinstance(inputs, list):
            return items
        return type(inputs)(*items) if hasattr(inputs, "_fields") else tuple(items)  # a namedtuple stays one
    return inputs


def _floats_differ(inputs: Any, dtype: torch.dtype | None) -> bool:
    if dtype is None:
        return False
    if isinstance(inputs, torch.Tensor):
        return inputs.is_floating_point() and inputs.dtype != dtype
    if isinstance(inputs, Mapping):
        return any(_floats_differ(v, dtype) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return any(_floats_differ(v, dtype) for v in inputs)
    return False


_CAST_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose probe forward needed the cast


def call_on_probe(model: nn.Module, inputs: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``model(inputs)`` with the inputs on ``device``. Floating-point inputs are cast to ``dtype``
    (the model's, :func:`input_placement`) only when the forward fails with them as given (a float32
    probe for a bfloat16 or float64 model): a model that takes them as they are (mixed precision,
    inputs it casts itself) gets them unchanged. The cast, once needed, is remembered for the model
    and reported once with a warning."""
    if model in _CAST_MODELS:
        return _call(model, place_inputs(inputs, device, dtype))
    placed = place_inputs(inputs, device)
    try:
        return _call(model, placed)
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or not _floats_differ(placed, dtype):
            raise
        # if the cast does not help either, its error propagates, with the first one as its context
        out = _call(model, place_inputs(placed, None, dtype))
        _CAST_MODELS.add(model)
        warnings.warn(
            f"dimscope: the probe's floating-point tensors are cast to {dtype} for this model, whose forward failed "
            f"with them as given: {str(e).splitlines()[0]}",
            UserWarning,
            stacklevel=3,
        )
        return out


def _token_mask(probe: Any, key: str | None, model: nn.Module) -> torch.Tensor | None:
    """The (B, T) mask ``key`` (``"attention_mask"``, Hugging Face style) of the probe as booleans: a
    dict probe's entry, or the element of a tuple probe at the position ``model.forward`` gives that
    parameter; else None."""
    if key is None:
        return None
    if isinstance(probe, Mapping):
        return as_token_mask(probe.get(key))
    if isinstance(probe, (tuple, list)):  # positional inputs
        i = positional_index(model, key)
        return as_token_mask(probe[i]) if i is not None and i < len(probe) else None
    return None


def _drop_padding(outs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """(B, T, D) outputs whose (B, T) matches the attention mask: the real tokens only (T x D rows)."""
    if mask is None:
        return outs
    return {k: (v[mask.to(v.device)] if v.ndim == 3 and tuple(v.shape[:2]) == tuple(mask.shape) else v) for k, v in outs.items()}


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def probe_forward(
    model: nn.Module, probe: Any, layers: Sequence[str], *, batch_size: int | None = None
) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` on the probe inputs: eval mode, ``torch.no_grad()``, in chunks of
    ``batch_size`` inputs, concatenated along the batch; every module's train/eval flag is restored.
    The inputs go to the model's device, and to its dtype when it needs that (:func:`call_on_probe`)."""
    flags = [(m, m.training) for m in model.modules()]
    device, dtype = input_placement(model)
    n = _probe_len(probe)
    bs = batch_size or n
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    model.eval()
    try:
        # clone: an in-place op later in the forward (ReLU(inplace=True)) must not change what was seen
        with torch.no_grad(), capture(model, layers, clone=True) as cap:
            for a in range(0, n, bs):
                cap.clear()
                call_on_probe(model, _slice_probe(probe, a, min(a + bs, n)), device, dtype)
                for name in layers:
                    if name in cap.outputs:
                        chunks[name].append(cap.outputs[name])
    finally:
        for m, was in flags:
            m.training = was
    return {name: (parts[0] if len(parts) == 1 else torch.cat(parts, 0)) for name, parts in chunks.items() if parts}


def _run_job(job: Callable[[], None], errors: list[BaseException]) -> None:
    """Run one measurement job; a failure becomes a warning, never an exception in training."""
    try:
        job()
    except Exception as e:
        errors.append(e)
        warnings.warn(f"dimscope: a measurement failed and was skipped: {e!r}", RuntimeWarning, stacklevel=3)


def _usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_WORKERS_LOCK = threading.Lock()
_WORKERS: list[int] = [0, 1]  # measurement threads running, and torch's thread count from before the first


class _Worker:
    """One background thread with a bounded queue of jobs; errors become warnings.

    torch ops on this thread get an OpenMP team of their own, of the size training's team has unless
    told otherwise; two such teams on the same cores spin against each other (measured: training
    twice as slow on 2 cores). The worker's team is therefore sized by the Tracker
    (``torch_threads``, see ``Tracker._thread_budget``)."""

    def __init__(self, maxsize: int, torch_threads: int = 1) -> None:
        self.torch_threads = max(1, int(torch_threads))
        self.q: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=maxsize)
        self.errors: list[BaseException] = []
        # torch.set_num_threads on the worker also sets the count that threads started later take their
        # team size from (putting it back while a worker runs made its ops slower than on one thread):
        # the last worker to stop puts back the count from before the first one started
        with _WORKERS_LOCK:
            if _WORKERS[0] == 0:
                _WORKERS[1] = torch.get_num_threads()
            _WORKERS[0] += 1
        self.thread = threading.Thread(target=self._run, name="dimscope-measure", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Best effort (Linux): the measurement thread yields the CPU to training.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError, PermissionError):
            pass
        torch.set_num_threads(self.torch_threads)  # this thread's team; training's keeps its size
        while True:
            job = self.q.get()
            try:
                if job is None:
                    with _WORKERS_LOCK:
                        _WORKERS[0] -= 1
                        if _WORKERS[0] == 0:
                            # set here, not on the thread that closes: its own team keeps its size
                            torch.set_num_threads(_WORKERS[1])  # the count threads started from now on take
                    return
                _run_job(job, self.errors)
            finally:
                self.q.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.q.put(job)

    def join(self) -> None:
        self.q.join()

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join()


class Tracker:
    """Measure the dimensionality of chosen layers every ``every`` optimizer steps.

    Parameters
    ----------
    model:
        The ``nn.Module`` being trained.
    probe:
        The fixed probe inputs (tensor, tuple of tensors, or dict of tensors), required in probe mode.
        At each measurement they go to the model's device; floating-point ones are cast to the
        dtype of its first floating-point parameter only if the forward fails without (a float32
        probe for a bfloat16 or float64 model), with a warning.
    every:
        Measure when ``step % every == 0``.
    layers:
        Module paths: an exact name, a glob, a list, a predicate, or ``"auto"`` (default).
    run:
        The run directory for the SQLite store; ``None`` keeps results in memory only
        (``tracker.history``).
    mode:
        ``"probe"``, ``"batch"`` or ``("probe", "batch")``.
    metrics:
        Metric names, or a mapping name → parameters; default all (see :mod:`dimscope.metrics`).
    conventions:
        ``("centered",)`` by default; add ``"uncentered"`` to record both on the same run.
    spectra:
        ``"all"`` stores every eigenvalue, an int K the top K, ``None`` none.
    spectra_every:
        Compute the whole spectrum (every metric, and the stored spectra) when
        ``step % spectra_every == 0`` (if it is not a multiple of ``every``: at the first measurement
        in each block of ``spectra_every`` steps); default ``every``, i.e. at every measurement. At the other
        measurements only the moment metrics (``stable_rank``, ``participation_ratio``: tr C, tr C²
        and λ_1 by Lanczos, no eigendecomposition) are recorded, at a fraction of the cost. With
        ``spectra=None`` and only moment metrics requested, no measurement needs an
        eigendecomposition.
    weight_metrics:
        Also measure the spectrum of each tracked layer's weight matrix.
    weight_every:
        Measure weight spectra when ``step % weight_every == 0`` (if it is not a multiple of
        ``every``: at the first measurement in each block of ``weight_every`` steps; default
        ``10 * every``: weights move slowly, and their eigendecomposition is as costly as the activations').
    grad_norm:
        Record the global gradient norm at each measurement (call ``step`` before ``zero_grad``).
    max_rows:
        Cap on samples per layer (tokens or positions are subsampled with a fixed seed).
    conv:
        ``"channels"`` (default) or ``"flatten"`` for (B, C, H, W) outputs.
    probe_batch_size:
        Run the probe forward in chunks of this many inputs.
    token_mask:
        The (B, T) mask that marks real tokens with 1 or True: a parameter of the model's forward
        (default ``"attention_mask"``), read from a dict probe's key or a tuple probe's position and,
        in batch mode, from the training forward's arguments, by keyword or position (an additive
        0 / -inf mask is not one). Layer outputs of shape
        (B, T, D) whose (B, T) matches it keep only the marked tokens. ``None`` measures every
        position (e.g. an encoder-decoder model whose decoder length can equal the encoder's, where
        the encoder's mask would also select decoder positions).
    background:
        Where the spectra are computed (see "Where the work happens" in the module docstring):
        ``True`` a background thread; ``False`` inline at each measured step (then :meth:`step`
        returns the values); ``"batched"`` buffered and computed together at each commit; ``"auto"``
        (default) a thread when torch leaves CPU cores free, else ``"batched"`` (on a GPU too).
    overwrite:
        Start an existing run afresh instead of appending to it.
    commit_every, commit_seconds:
        The store's commit policy.
    extensions:
        :class:`TrackerExtension` objects measuring alongside.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any = None,
        *,
        every: int = 5,
        layers: LayerSelection = "auto",
        run: str | None = None,
        mode: str | Sequence[str] = "probe",
        metrics: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
        conventions: Sequence[str] = ("centered",),
        spectra: str | int | None = "all",
        spectra_every: int | None = None,
        weight_metrics: bool = True,
        weight_every: int | None = None,
        grad_norm: bool = False,
        max_rows: int | None = 4096,
        conv: str = "channels",
        seed: int = 0,
        probe_batch_size: int | None = None,
        background: bool | str = "auto",
        queue_size: int = 16,
        overwrite: bool = False,
        commit_every: int = 10,
        commit_seconds: float = 2.0,
        extensions: Sequence[TrackerExtension] = (),
        config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        token_mask: str | None = "attention_mask",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"The 'model' parameter of Tracker must be a torch.nn.Module. Got {type(model).__name__} instead.")
        self.model = model
        self.every = check_int(every, "every", min_value=1, owner="Tracker")
        modes = (mode,) if isinstance(mode, str) else _names(mode, "mode", "'probe', 'batch' or both")
        if not modes:
            raise ValueError("The 'mode' parameter of Tracker must name at least one of 'probe', 'batch'. Got ().")
        for m in modes:
            check_choice(m, "mode", ("probe", "batch"), owner="Tracker")
        if len(set(modes)) < len(modes):
            raise ValueError(f"The 'mode' parameter of Tracker must not repeat a mode. Got {mode!r}.")
        self.modes = modes
        self.conventions = (conventions,) if isinstance(conventions, str) else _names(conventions, "conventions", "'centered', 'uncentered' or both")
        if not self.conventions:
            raise ValueError("The 'conventions' parameter of Tracker must name at least one convention. Got ().")
        for c in self.conventions:
            check_choice(c, "conventions", ("centered", "uncentered"), owner="Tracker")
        if len(set(self.conventions)) < len(self.conventions):
            raise ValueError(f"The 'conventions' parameter of Tracker must not repeat a convention. Got {conventions!r}.")
        if max_rows is not None:
            check_int(max_rows, "max_rows", min_value=2, owner="Tracker")
        self.max_rows = max_rows
        self.conv = check_choice(conv, "conv", ("channels", "flatten"), owner="Tracker")
        if spectra == "all" or spectra is None:
            self.top_k: int | None = None
        else:
            self.top_k = check_int(spectra, "spectra", min_value=1, owner="Tracker")
        self.store_spectra = spectra is not None
        self.metric_spec = check_metric_spec(metrics, owner="Tracker")
        self.spectra_every = (
            self.every if spectra_every is None else check_int(spectra_every, "spectra_every", min_value=1, owner="Tracker")
        )
        self._moment_spec = {k: v for k, v in self.metric_spec.items() if k in MOMENT_METRICS}
        # the metrics' parameters (ε, q), stored with every measured value; the moment metrics have none
        self._params = {full: (json.dumps(p, sort_keys=True) if p else None)
                        for full, p in ((True, metric_params(self.metric_spec)), (False, metric_params(self._moment_spec)))}
        # Does any measurement need the whole spectrum? Not when no spectrum is stored and every
        # requested metric is a moment metric.
        self._needs_spectrum = self.store_spectra or len(self._moment_spec) < len(self.metric_spec)
        self._top_vectors: dict[tuple[str, str, str], np.ndarray] = {}  # Lanczos warm starts
        self._blocks: dict[str, int] = {}  # the last block of spectra_every / weight_every steps measured
        self._workspace = Workspace()  # float64 buffers reused by every flush (one flush at a time)
        self.weight_metrics = check_bool(weight_metrics, "weight_metrics", owner="Tracker")
        self.weight_every = (
            10 * self.every if weight_every is None else check_int(weight_every, "weight_every", min_value=1, owner="Tracker")
        )
        self.grad_norm = check_bool(grad_norm, "grad_norm", owner="Tracker")
        if run is not None and not isinstance(run, (str, os.PathLike)):
            raise TypeError(f"The 'run' parameter of Tracker must be a folder path (str or os.PathLike) or None. Got {run!r} instead.")
        self.seed = check_int(seed, "seed", owner="Tracker")
        check_int(commit_every, "commit_every", min_value=1, owner="Tracker")
        check_float(commit_seconds, "commit_seconds", low=0.0, owner="Tracker")
        check_int(queue_size, "queue_size", min_value=1, owner="Tracker")
        check_bool(overwrite, "overwrite", owner="Tracker")
        if not isinstance(extensions, Iterable) or isinstance(extensions, (str, bytes)):
            raise TypeError(f"The 'extensions' parameter of Tracker must be a list of TrackerExtension objects. Got {extensions!r} instead.")
        extensions = list(extensions)
        for i, ext in enumerate(extensions):
            missing = [m for m in _EXTENSION_METHODS if not callable(getattr(ext, m, None))]
            if missing:
                raise TypeError(
                    f"The 'extensions' parameter of Tracker must hold TrackerExtension objects (with {', '.join(_EXTENSION_METHODS)}). "
                    f"Got {ext!r} ({type(ext).__name__}) at position {i}, without {', '.join(missing)}."
                )
        self.probe = probe
        if "probe" in modes:
            if probe is None:
                raise ValueError(
                    "The 'probe' parameter of Tracker is required in probe mode (the default). "
                    "Pass a fixed set of inputs, or use mode='batch'. Got None."
                )
            n = _probe_len(probe)
            if n < 2:
                raise ValueError(f"The 'probe' parameter of Tracker must hold at least 2 samples. Got {n}.")
        if probe_batch_size is not None:
            check_int(probe_batch_size, "probe_batch_size", min_value=1, owner="Tracker")
        self.probe_batch_size = probe_batch_size
        if token_mask is not None and not isinstance(token_mask, str):
            raise TypeError(f"The 'token_mask' parameter of Tracker must be a str (a keyword argument of the model) or None. Got {token_mask!r}.")
        self.token_mask = token_mask
        self._probe_mask = _token_mask(probe, token_mask, model) if "probe" in modes else None
        if token_mask not in (None, "attention_mask") and isinstance(probe, Mapping) and token_mask not in probe:
            warnings.warn(f"dimscope: the probe has no {token_mask!r} (token_mask); every position of its (B, T, D) outputs is "
                          f"measured. Its keys: {', '.join(map(str, probe))}.", UserWarning, stacklevel=2)
        self.layers = resolve_layers(model, layers)
        self.history: list[dict[str, Any]] = []
        self.latest: dict[tuple[str, str], float] = {}
        self.extensions: list[TrackerExtension] = []
        self.verbose = verbose
        self.closed = False
        self.n_measurements = 0
        self.last_step: int | None = None
        self._train_rows: list[_Row] = []
        self._main_calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._nonfinite_warned: set[str] = set()
        self._failure_warned: set[str] = set()
        self._silent_warned: set[str] = set()  # layers that gave no output in a forward (a warning each)
        # layers whose output shape does not fit the probe: a T that is not the attention mask's, a 1-D
        # output that is not one value per input (a warning each)
        self._shape_warned: set[str] = set()
        self.errors: list[BaseException] = []  # measurements that failed (synchronous mode)

        where = self._resolve_background(background)  # validated before the store records a session
        self.store = RunStore(run, overwrite=overwrite, commit_every=commit_every, commit_seconds=commit_seconds) if run is not None else None
        try:
            self._write_manifest(config)
        except BaseException:
            if self.store is not None:
                self.store.close()
            raise
        self._batch_capture: capture | None = None
        if "batch" in modes:
            # the training batch's attention_mask (a keyword argument of the model) leaves padding out, as in probe mode
            self._batch_capture = capture(model, self.layers, clone=True, only_grad=True, mask_key=token_mask)
            self._batch_capture.__enter__()
        self.background = where == "thread"
        self.batched = where == "batched"
        # The flush runs on the training thread while training waits: its eigendecompositions may
        # use the threads torch trains with. A background thread keeps to one.
        self._eig_threads = 1 if self.background else max(1, min(torch.get_num_threads(), 8))
        self._pending: list[_Measurement] = []
        self._pending_bytes = 0
        self._next_commit = time.monotonic() + commit_seconds  # see _commit_due
        self._commit_in_flight = False
        self._batch_size = commit_every
        self._batch_seconds = commit_seconds
        self._batch_armed_always = False
        # numpy's BLAS runs one thread while training waits, and on the measurement thread beside CPU training
        self._blas_limited = not self.background or self._on_cpu()
        self._worker = _Worker(queue_size, self._thread_budget()) if self.background else None
        atexit.register(self._atexit)
        try:
            for ext in extensions:
                self.add_extension(ext)
        except BaseException:
            self.close()  # hooks removed, store closed: a constructor that raises leaves nothing behind
            raise
        if verbose:
            print(f"dimscope: tracking {len(self.layers)} layers: {', '.join(self.layers)}")

    # -- set-up ----------------------------------------------------------------------------------
    def _write_manifest(self, config: Mapping[str, Any] | None) -> None:
        if self.store is None:
            return
        n_params = sum(p.numel() for p in self.model.parameters())
        previous = self.store.get_manifest()
        sessions = list(previous.get("sessions", []))
        params = metric_params(self.metric_spec)
        sessions.append({"started": time.time(), "modes": list(self.modes), "conventions": list(self.conventions),
                         "layers": self.layers, "every": self.every, "metrics": {k: params.get(k, {}) for k in self.metric_spec}})
        # An appended session keeps the run's reading convention (its first session's), and the run
        # lists every mode and convention it holds.
        default = self.convention_name(self.modes[0], self.conventions[0])
        entries: dict[str, Any] = {
            "dimscope_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "model_class": type(self.model).__name__,
            "n_parameters": n_params,
            "layers": self.layers,
            "modes": list(dict.fromkeys([*previous.get("modes", []), *self.modes])),
            "conventions": list(dict.fromkeys([*previous.get("conventions", []), *self.conventions])),
            "default_convention": previous.get("default_convention", default),
            "every": self.every,
            "metrics": self.metric_spec,
            # the definitions of every metric the run holds, an earlier session's included
            "metric_definitions": {**previous.get("metric_definitions", {}), **{k: DEFINITIONS[k] for k in self.metric_spec}},
            "max_rows": self.max_rows,
            "conv": self.conv,
            "spectra_top_k": self.top_k,
            "store_spectra": self.store_spectra,
            "spectra_every": self.spectra_every,
            "moment_metrics": "stable_rank and participation_ratio from tr C, tr C^2 and lambda_1 (Lanczos, certified "
            "within 1e-10 lambda_1 by a Cholesky test, else a full eigendecomposition) at measurements without the whole spectrum",
            "weight_metrics": self.weight_metrics,
            "weight_every": self.weight_every,
            "grad_norm": self.grad_norm,
            "probe_eval_mode": True,
            "sessions": sessions,
            "config": dict(config or previous.get("config", {})),
        }
        if self.probe is not None:
            entries["probe_hash"] = _probe_hash(self.probe)
            entries["probe_size"] = _probe_len(self.probe)
            if self._probe_mask is not None:
                entries["probe_tokens"] = int(self._probe_mask.sum())  # attention_mask: padding is not measured
            entries["probe_shape"] = [list(t.shape) for t in _probe_tensors(self.probe)]
        entries["token_mask"] = self.token_mask
        self.store.set_manifest(entries)
        self.store.commit()

    def _on_cpu(self) -> bool:
        device, _ = input_placement(self.model)
        return device is None or device.type == "cpu"

    def _thread_budget(self) -> int:
        """Threads for the measurement thread's torch ops: on CPU the cores training's own threads
        leave free (at least one), since both teams spin between ops; on an accelerator, where
        training's CPU threads mostly wait, as many as training has."""
        n = torch.get_num_threads()
        return max(1, _usable_cores() - n) if self._on_cpu() else n

    def _resolve_background(self, background: bool | str) -> str:
        """``"thread"``, ``"inline"`` or ``"batched"``.

        ``"auto"`` uses a measurement thread only where it does not compete with training for
        cores. When torch already uses every core, its OpenMP workers spin between ops and a second
        busy thread stalls them; there the spectra are batched instead. Measured by
        benchmarks/overhead.py on 2 CPU cores and beside a GPU's training (an H200 with 16 cores:
        every 5 steps the thread added +126 % where its work was counted in full; every 50 steps
        +31 % against +10 % batched).
        """
        if background == "auto":
            return "thread" if torch.get_num_threads() < _usable_cores() else "batched"
        if background == "batched":
            return "batched"
        if not isinstance(background, bool):
            raise ValueError(
                f"The 'background' parameter of Tracker must be True, False, 'batched' or 'auto'. Got {background!r} instead."
            )
        return "thread" if background else "inline"

    @staticmethod
    def convention_name(mode: str, convention: str) -> str:
        return f"{mode}/{convention}"

    def add_extension(self, ext: TrackerExtension) -> None:
        self.extensions.append(ext)
        ext.setup(self)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the training thread at the next :meth:`step` (for alert callbacks)."""
        self._main_calls.put(fn)

    # -- the loop --------------------------------------------------------------------------------
    def step(self, step: int, loss: float | torch.Tensor | None = None, *, force: bool = False,
             **scalars: float | torch.Tensor) -> dict[tuple[str, str], float] | None:
        """Record the training scalars of optimizer step ``step``; measure if ``step % every == 0``.

        A scalar may be a number or a one-element tensor: ``loss=loss.detach()`` on a GPU spares the
        wait that ``loss.item()`` costs at every step (a tensor on an accelerator is copied there
        and read when it is written: with the next measurement, which waits for the device anyway,
        or at the next commit).

        Returns the measured values (``(layer, metric) → value``) when measuring synchronously,
        else None (see :attr:`latest`).
        """
        if self.closed:
            raise RuntimeError("This Tracker is closed; create a new one to keep measuring.")
        if type(step) is not int or step < 0:  # the check costs a few µs: only off the fast path
            step = check_int(step, "step", min_value=0, owner="Tracker.step")
        self._drain_main_calls()
        now = time.time()
        if loss is not None:
            scalars = {"loss": loss, **scalars}
        # all checked before any is kept: a bad one leaves no partial step behind
        self._train_rows.extend([(step, now, "", k, _scalar(v, k), "training", "") for k, v in scalars.items()])
        measuring = force or step % self.every == 0
        for ext in self.extensions:
            ext.on_step(self, step, measuring)
        self.last_step = step
        try:
            result = None
            if measuring:
                result = self._measure(step, now, force)
            elif len(self._train_rows) >= 2048:
                self._submit(self._flush_rows_job(self._take_train_rows()))
            t = time.monotonic()
            if t >= self._next_commit:
                self._commit_due(t)
            return result
        finally:
            if self._batch_capture is not None and self._batch_capture.compiled:
                # a torch.compile'd forward keeps the hooks it was traced with: removing them between
                # measurements would lose every later one, so they stay (test_integrations_compile.py)
                self._batch_armed_always = True
            if self._batch_capture is not None and not self._batch_armed_always:
                # Hooks live only for the training forward before a step that will be measured (a
                # registered hook slows every forward, even one that records nothing).
                self._arm_batch_capture((step + 1) % self.every == 0)

    def _commit_due(self, t: float) -> None:
        """Every ``commit_seconds``, checked at each step: what is buffered (measurements, training
        scalars) is written and committed, so a SIGKILL loses at most that much also when
        measurements are far apart. On the measurement thread at most one such job waits at a time
        (a slow measurement must not fill the bounded queue and stall training)."""
        self._next_commit = t + self._batch_seconds
        if self._commit_in_flight:
            return
        if self._pending:
            self._flush_pending()  # computes, writes and commits
        rows, store = self._take_train_rows(), self.store

        def job() -> None:
            try:
                self._write_rows(rows)
                if store is not None and not store.closed:
                    store.commit()
            finally:
                self._commit_in_flight = False

        self._commit_in_flight = self._worker is not None
        self._submit(job)

    def _arm_batch_capture(self, on: bool) -> None:
        cap = self._batch_capture
        if cap is None or self.closed:
            return
        if on and not cap.armed:
            cap.__enter__()
        elif not on and cap.armed:
            cap.remove()

    def _take_train_rows(self) -> list[_Row]:
        rows, self._train_rows = self._train_rows, []
        return rows

    def _flush_rows_job(self, rows: list[_Row]) -> Callable[[], None]:
        def job() -> None:
            self._write_rows(rows)  # to the store, or to history without one

        return job

    def _collect_features(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        feats: dict[str, dict[str, torch.Tensor]] = {}
        if "probe" in self.modes:
            feats["probe"] = self._probe_features(step)
        if "batch" in self.modes and self._batch_capture is not None:
            outs = dict(self._batch_capture.outputs)
            if not outs and not self._batch_capture.armed:
                # The steps are not consecutive (or ``force`` measured off the schedule), so the
                # forward before this step was not recorded: record every training forward from now on.
                self._batch_armed_always = True
                self._arm_batch_capture(True)
                warnings.warn(
                    f"dimscope: batch mode did not record the training forward before step {step} (the steps "
                    "passed to Tracker.step are not consecutive); recording every training forward from now on.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            elif not outs:
                warnings.warn(
                    "dimscope: batch mode found no training forward to measure (no forward with grad "
                    "enabled since the last measurement).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if outs:
                self._warn_silent_layers(outs, step, "in the training forward", "the forward did not call it, or called it without grad")
            feats["batch"] = self._features(self._unpadded(outs, self._batch_capture.mask, step), step)
            self._batch_capture.clear()
        return feats

    def _unpadded(self, outs: dict[str, torch.Tensor], mask: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        """:func:`_drop_padding`, with a warning (once per layer) for a (B, T', D) output whose (B, T')
        is not the mask's (B, T) while the mask marks padding: that layer is measured with it."""
        if mask is not None:
            odd = [k for k, v in outs.items() if v.ndim == 3 and tuple(v.shape[:2]) != tuple(mask.shape) and k not in self._shape_warned]
            if odd and not bool(mask.all()):
                for k in odd:
                    self._shape_warned.add(k)
                    warnings.warn(f"dimscope: layer {k!r} gives (B, T, D) = {tuple(outs[k].shape)} at step {step}, but the "
                                  f"attention mask is {tuple(mask.shape)}: its padding positions cannot be dropped and are "
                                  "measured with the real tokens (this warning is not repeated).", RuntimeWarning, stacklevel=4)
        return _drop_padding(outs, mask)

    def _warn_silent_layers(self, outs: Mapping[str, Any], step: int, where: str, why: str) -> None:
        """Warn (once per layer) about a tracked layer that gave no output in a forward."""
        for name in self.layers:
            if name not in outs and name not in self._silent_warned:
                self._silent_warned.add(name)
                warnings.warn(f"dimscope: layer {name!r} produced no output {where} at step {step} ({why}): it is "
                              "measured only where it gives one (this warning is not repeated).", RuntimeWarning, stacklevel=4)

    def _probe_features(self, step: int) -> dict[str, torch.Tensor]:
        try:
            outs = probe_forward(self.model, self.probe, self.layers, batch_size=self.probe_batch_size)
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11: the error keeps its type, and says where it came from
                shapes = [tuple(t.shape) for t in _probe_tensors(self.probe)]
                e.add_note(f"dimscope: raised by the model's forward on the 'probe' of Tracker (tensor shapes {shapes}) "
                           f"at step {step}: the probe must be an input the model accepts.")
            raise
        self._warn_silent_layers(outs, step, "in the probe forward", "the forward did not call it")
        for name, t in outs.items():  # e.g. a 1-D probe, one unbatched input: its outputs are not samples
            if t.ndim == 1 and name not in self._shape_warned and t.shape[0] != (n := _probe_len(self.probe)):  # this rank's probe
                self._shape_warned.add(name)
                warnings.warn(f"dimscope: layer {name!r} gives a 1-D output of {t.shape[0]} values for a probe of {n} "
                              "inputs: it is read as that many samples of one feature, which is meaningless unless the probe is a "
                              "batch (an unbatched 1-D probe is one input; add a batch dimension) (this warning is not repeated).",
                              RuntimeWarning, stacklevel=3)
        return self._features(self._unpadded(outs, self._probe_mask, step), step)

    def _features(self, outs: Mapping[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Each layer's output as a feature matrix; a layer whose output cannot be one (a scalar) is
        skipped with a warning, the others are measured."""
        feats = {}
        for name, t in outs.items():
            try:
                feats[name] = to_features(t, max_rows=self.max_rows, conv=self.conv, seed=self.seed)
            except (ValueError, TypeError) as e:
                self._layer_failed(name, step, e)
        return feats

    def _layer_failed(self, layer: str, step: int, e: BaseException) -> None:
        if layer not in self._failure_warned:  # once per layer
            self._failure_warned.add(layer)
            warnings.warn(f"dimscope: layer {layer!r} could not be measured at step {step} and is skipped "
                          f"where it fails: {e!r}", RuntimeWarning, stacklevel=5)

    def _grad_norm(self) -> float | torch.Tensor:
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return float("nan")
        norms = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(torch.stack([n.to(torch.float64) for n in norms]))

    def _first_in_block(self, kind: str, step: int, period: int) -> bool:
        """Whether ``kind`` (spectra, weights) is due at this measurement: ``step % period == 0`` when
        ``every`` divides ``period``; otherwise the first measurement in each block of ``period``
        steps, so that the period is still honoured (every=3, weight_every=4: steps 0, 6, 9, 12...)."""
        if period % self.every == 0:
            return step % period == 0
        block = step // period
        if self._blocks.get(kind) == block:
            return False
        self._blocks[kind] = block
        return True

    def _measure(self, step: int, now: float, force: bool = False) -> dict[tuple[str, str], float] | None:
        full = self._needs_spectrum and (self._first_in_block("spectra", step, self.spectra_every) or force)
        measure_any = full or bool(self._moment_spec)
        feats = self._collect_features(step) if measure_any else {}
        weights: dict[str, torch.Tensor] = {}
        if measure_any and self.weight_metrics and self._first_in_block("weights", step, self.weight_every):
            weights = {name: w.detach().clone() for name, w in iter_layer_weights(self.model, self.layers)}
        if self.grad_norm:
            self._train_rows.append((step, now, "", "grad_norm", self._grad_norm(), "training", ""))  # a tensor: read later
        extra_jobs = []
        for ext in self.extensions:
            flat = feats.get(self.modes[0], {})
            j = ext.on_features(self, step, flat)
            if j is not None:
                extra_jobs.append(j)
        m = _Measurement(step, now, feats, weights, self._take_train_rows(), extra_jobs, full)
        self.n_measurements += 1
        if self.batched:
            self._pending.append(m)
            self._pending_bytes += m.nbytes()
            if len(self._pending) >= self._batch_size or self._pending_bytes >= _MAX_PENDING_BYTES:
                self._flush_pending()
            return None
        result: dict[tuple[str, str], float] = {}

        def job() -> None:
            result.update(self._finish(m, None))
            if self.store is not None:
                self.store.measurement_done()

        self._submit(job)
        return result if self._worker is None else None

    def _finish(self, m: _Measurement, results: _Results | None) -> dict[tuple[str, str], float]:
        """Metrics, rows and extension callbacks of one measurement (``results``: a flush's, or None
        to compute this measurement's now)."""
        try:
            if results is None:
                results = self._results([m])
            values = self._compute(m, results)
        except BaseException:
            if m.rows:  # the measurement fails; its training scalars (loss...) are kept
                rows, m.rows = m.rows, []
                self._write_rows(rows)
            raise
        # an extension that fails is reported as such; the measurement itself stands
        for ext, call in [(None, j) for j in m.jobs] + [(e, lambda e=e: e.on_metrics(self, m.step, values)) for e in self.extensions]:
            try:
                call()
            except Exception as e:  # noqa: BLE001 - never an exception in training
                self.errors.append(e)
                label = ext.name if ext is not None and ext.name != TrackerExtension.name else type(ext).__name__
                who = f"the extension {label!r} (on_metrics)" if ext is not None else "an extension's job (on_features)"
                warnings.warn(f"dimscope: {who} failed at step {m.step}; the measurement is kept: {e!r}", RuntimeWarning, stacklevel=2)
        return values

    def _flush_pending(self) -> None:
        """Compute the buffered measurements' spectra together, write them, commit."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        try:
            results = self._results(pending)
        except Exception as e:  # noqa: BLE001 - each measurement then fails alone, with a warning
            results = ({key: e for key, *_ in self._tasks(pending)}, {})
        for m in pending:
            _run_job(lambda m=m: self._finish(m, results), self.errors)
        if self.store is not None and not self.store.closed:
            self.store.commit()

    def _tasks(self, pending: list[_Measurement]) -> list[tuple[_Key, torch.Tensor, bool | None, bool, tuple[str, str, str]]]:
        """(key, tensor, center (None: a weight), full, warm-start slot) of every spectrum to compute."""
        tasks = []
        for m in pending:
            for mode, layer_feats in m.feats.items():
                for layer, X in layer_feats.items():
                    for conv in self.conventions:
                        tasks.append(((id(X), conv == "centered"), X, conv == "centered", m.full, (mode, layer, conv)))
            for layer, W in m.weights.items():
                tasks.append(((id(W), None), W, None, m.full, ("weight", layer, "")))
        return tasks

    def _results(self, pending: list[_Measurement]) -> _Results:
        """Every spectrum (or moments) of ``pending`` and its metric values, keyed by (id of the
        tensor, centered; None for weights).

        Tracker's own kernel (:func:`~dimscope.spectrum.batch_spectra`): float64 Gram matrices by
        torch, eigendecompositions stacked by size on ``_eig_threads`` threads with one BLAS thread
        each, metrics vectorised over same-length spectra. A subclass that overrides
        :meth:`features_to_spectrum` is served through it, one by one, with whole spectra.
        """
        tasks = self._tasks(pending)
        spectra: _Spectra = {}
        if type(self).features_to_spectrum is Tracker.features_to_spectrum:
            # One BLAS thread while training waits, and on the measurement thread beside training on
            # CPU: numpy's BLAS threads spin after each call, and beside training's OpenMP team they made
            # training twice as slow (2 cores, background=True). Beside an accelerator, where training's
            # CPU threads mostly wait, the measurement thread keeps the BLAS threads (wide layers).
            with _one_blas_thread() if self._blas_limited else contextlib.nullcontext():
                got = batch_spectra([(t, c, full) for _, t, c, full, _ in tasks], threads=self._eig_threads,
                                    starts=self._top_vectors, slots=[slot for *_, slot in tasks], workspace=self._workspace)
            for (key, *_), r in zip(tasks, got):
                spectra[key] = r
        else:
            for key, t, center, _, _ in tasks:
                try:
                    spectra[key] = weight_spectrum(t) if center is None else self.features_to_spectrum(t, center)
                except Exception as e:  # noqa: BLE001 - reported when the measurement is finished
                    spectra[key] = e
        return spectra, self._metric_values(spectra)

    def _metric_values(self, spectra: _Spectra) -> dict[_Key, dict[str, float]]:
        """The metrics of every result, vectorised over spectra of one length."""
        out: dict[_Key, dict[str, float]] = {}
        by_len: dict[int, list[_Key]] = {}
        moments: list[_Key] = []
        for key, r in spectra.items():
            if isinstance(r, Spectrum):
                by_len.setdefault(len(r.values), []).append(key)
            elif isinstance(r, Moments):
                moments.append(key)
        for keys in by_len.values():
            specs = [spectra[k] for k in keys]
            vals = compute_metrics_batch(np.stack([s.values for s in specs]), np.array([s.trace for s in specs]), self.metric_spec)  # type: ignore[union-attr]
            for i, k in enumerate(keys):
                out[k] = {name: float(v[i]) for name, v in vals.items()}
        if moments:
            ms: list[Moments] = [spectra[k] for k in moments]
            vals = moment_metrics(np.array([x.trace for x in ms]), np.array([x.top for x in ms]), np.array([x.sum_sq for x in ms]),
                                  self._moment_spec, sum_sq_rel=np.array([x.sum_sq_rel for x in ms]))
            for i, k in enumerate(moments):
                out[k] = {name: float(v[i]) for name, v in vals.items()}
        return out

    def _submit(self, job: Callable[[], None]) -> None:
        if self._worker is None:
            _run_job(job, self.errors)
        else:
            self._worker.submit(job)

    # -- measurement (runs on the worker thread) -----------------------------------------------
    def features_to_spectrum(self, X: torch.Tensor, center: bool) -> Spectrum:
        """One layer's spectrum (override point, e.g. for all-reduced Gram matrices)."""
        return spectrum(X, center=center)

    def _compute(self, m: _Measurement, results: _Results) -> dict[tuple[str, str], float]:
        spectra, metric_values = results
        step, now = m.step, m.now
        names = self.metric_spec if m.full else self._moment_spec
        rows: list[_Row] = _read_scalars(m.rows)
        measured: list[tuple[int, float, str, str, str, int, int, bool, Any]] = []  # what each layer's values were measured on
        params = self._params[m.full]
        specs: list[tuple[int, float, str, Spectrum, str, str]] = []  # to store
        values: dict[tuple[str, str], float] = {}
        primary = self.convention_name(self.modes[0], self.conventions[0])
        failed: list[tuple[str, BaseException]] = []

        def metrics_of(key: _Key, layer: str, space: str) -> tuple[Spectrum | None, dict[str, float]]:
            r = spectra[key]
            if isinstance(r, NonFiniteError):
                if space == "activation" and layer not in self._nonfinite_warned:
                    self._nonfinite_warned.add(layer)
                    warnings.warn(
                        f"dimscope: NaN or Inf activations (or values too large or too small for float64) in layer {layer!r} at step {step}; its metrics are "
                        "recorded as NaN and training goes on.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                return None, {k: float("nan") for k in names}
            if isinstance(r, BaseException):  # this layer only; the others are kept
                failed.append((layer, r))
                return None, {}
            vals = metric_values[key]
            return (r if isinstance(r, Spectrum) and m.full else None), {k: vals[k] for k in names}

        for mode, layer_feats in m.feats.items():
            for layer, X in layer_feats.items():
                for conv_name in self.conventions:
                    cname, key = self.convention_name(mode, conv_name), (id(X), conv_name == "centered")
                    spec, vals = metrics_of(key, layer, "activation")
                    if vals:
                        measured.append((step, now, layer, "activation", cname, *_shape(spectra[key], X), key[1], params))
                    for metric, v in vals.items():
                        rows.append((step, now, layer, metric, v, "activation", cname))
                        if cname == primary:
                            values[(layer, metric)] = v
                    if spec is not None:
                        specs.append((step, now, layer, spec, "activation", cname))
        for layer, W in m.weights.items():
            spec, vals = metrics_of((id(W), None), layer, "weight")
            if vals:
                measured.append((step, now, layer, "weight", "weight", *_shape(spectra[(id(W), None)], W), False, params))
            for metric, v in vals.items():
                rows.append((step, now, layer, metric, v, "weight", "weight"))
                values[(layer, f"weight/{metric}")] = v
            if spec is not None:
                specs.append((step, now, layer, spec, "weight", "weight"))
        if failed:
            if len(failed) == sum(map(len, m.feats.values())) * len(self.conventions) + len(m.weights):
                # nothing measured: the measurement fails (and is skipped) as a whole, its training
                # scalars (loss...) are kept (by _finish)
                raise failed[0][1]
            for layer, e in failed:
                self._layer_failed(layer, step, e)
        for r in rows[: len(m.rows)]:  # the training scalars, read
            values[("", r[3])] = r[4]
        m.rows = []  # written below, with the measured values
        self._write_rows(rows)
        if self.store is not None and measured:
            self.store.add_measured(measured)
        if self.store is not None and self.store_spectra and specs:
            self.store.add_spectra(specs, top_k=self.top_k)
        self.latest = values
        return values

    def _write_rows(self, rows: list[_Row]) -> None:
        """Scalar rows to the store, or to :attr:`history` when there is no run directory."""
        if not rows:
            return
        rows = _read_scalars(rows)
        if self.store is not None:
            self.store.add_scalars(rows)
        else:
            self.history.extend(dict(zip(("step", "wall_time", "layer", "metric", "value", "space", "convention"), r)) for r in rows)

    # -- ending ----------------------------------------------------------------------------------
    def _drain_main_calls(self) -> None:
        if self._main_calls.empty():
            return
        while True:
            try:
                fn = self._main_calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def flush(self) -> None:
        """Wait until every queued measurement is computed and written, then commit."""
        self._flush_pending()
        rows = self._take_train_rows()
        if rows:
            self._submit(self._flush_rows_job(rows))
        if self._worker is not None:
            self._worker.join()
        if self.store is not None and not self.store.closed:
            self.store.commit()
        self._drain_main_calls()

    def close(self) -> None:
        """Write everything measured, commit, remove the hooks, close the store. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._batch_capture is not None:
                self._batch_capture.remove()
            self.closed = False
            try:
                self.flush()
            finally:
                self.closed = True
            for ext in self.extensions:
                ext.close(self)
            if self.store is not None and not self.store.closed:
                self.store.commit()
        finally:
            if self._worker is not None:
                self._worker.stop()
            if self.store is not None:
                self.store.close()
            atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def run(self):  # type: ignore[no-untyped-def]
        """A reader on this tracker's run (flushes first)."""
        if self.store is None:
            raise RuntimeError("This Tracker has no run directory (run=None); use tracker.history.")
        if not self.closed:
            self.flush()
        from .store import Run

        return Run(self.store.db_path)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shape(result: Any, t: torch.Tensor) -> tuple[int, int]:
    """(n_samples, n_features) a value was measured on: the result's own (a Spectrum or Moments; an
    all-reduced one counts every rank's rows), else the matrix's."""
    n = getattr(result, "n_samples", None)
    return (int(n), int(result.n_features)) if n is not None else (int(t.shape[0]), int(t[0].numel()))


# Whether a CPU tensor scalar is also read later, as an accelerator's is (tests exercise that path here).
_DEFER_CPU_SCALARS = False


def _names(value: Any, name: str, what: str) -> tuple[Any, ...]:
    """A tuple of ``value``'s items, or a TypeError naming the parameter (None, a number...)."""
    if not isinstance(value, Iterable) or isinstance(value, (bytes, Mapping)):
        raise TypeError(f"The '{name}' parameter of Tracker must be {what} (a string or a list of them). Got {value!r} instead.")
    return tuple(value)


def _scalar(v: Any, key: str = "loss") -> float | torch.Tensor:
    """A scalar passed to :meth:`Tracker.step`, as a float, or a one-element tensor on an accelerator
    as a private 0-d copy that is read later (:func:`_read_scalars`, when its row is written: with
    the next measurement, or at the next commit): reading it at every step would wait for the device
    at every step (``loss.item()`` does). The copy keeps a later in-place change out. A CPU tensor,
    and a tensor subclass (a DTensor), is read now: a copy costs more than the read on the CPU, and a
    subclass has no stacking read."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"The scalar {key!r} passed to Tracker.step must have one element. Got shape {tuple(v.shape)}.")
        if v.is_complex():
            raise TypeError(f"The scalar {key!r} passed to Tracker.step must be real. Got a tensor of dtype {v.dtype}.")
        if v.device.type == "meta":
            raise ValueError(f"The scalar {key!r} passed to Tracker.step must hold a value. Got a tensor on the 'meta' device.")
        if (v.device.type == "cpu" and not _DEFER_CPU_SCALARS) or type(v) not in (torch.Tensor, nn.Parameter):
            return float(v.item())
        return v.detach().reshape(()).clone()
    if isinstance(v, (str, bytes)) or v is None or (isinstance(v, np.ndarray) and v.dtype.kind in "USO"):  # float("0.5") parses
        raise TypeError(f"The scalar {key!r} passed to Tracker.step must be a number or a one-element tensor. Got {v!r}.")
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise TypeError(f"The scalar {key!r} passed to Tracker.step must be a number or a one-element tensor. Got {v!r}.") from e


def _read_scalars(rows: list[_Row]) -> list[_Row]:
    """``rows`` with every tensor value read as a float: one transfer per device and dtype (cast on
    the CPU: some devices have no float64). A value that cannot be read (a failed CUDA context)
    becomes NaN with a warning; the others are kept."""
    where = [i for i, r in enumerate(rows) if isinstance(r[4], torch.Tensor)]
    if not where:
        return list(rows)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in where:
        groups.setdefault((rows[i][4].device, rows[i][4].dtype), []).append(i)
    out = list(rows)
    for (device, _), idx in groups.items():
        ts = [rows[i][4] for i in idx]
        try:
            if device.type == "cuda":
                # copied on the stream that was current at step(), maybe on another thread: wait for every stream
                torch.cuda.synchronize(device)
            vals = torch.stack(ts).cpu().to(torch.float64).tolist()
        except Exception:  # noqa: BLE001 - one by one, so that one bad value stays alone
            vals = []
            for t in ts:
                try:
                    vals.append(float(t.item()))
                except Exception as e:  # noqa: BLE001 - the rows written beside it are kept
                    warnings.warn(f"dimscope: a training scalar could not be read from its device and is recorded as NaN: {e!r}",
                                  RuntimeWarning, stacklevel=2)
                    vals.append(float("nan"))
        for i, v in zip(idx, vals):
            r = rows[i]
            out[i] = (r[0], r[1], r[2], r[3], float(v), r[5], r[6])
    return out



