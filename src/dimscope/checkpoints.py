"""Checkpoint series: read a training run's checkpoints in step order, lazily, one model at a time.

Two layouts are recognised in a directory (they may not be mixed in one series):

* **Hugging Face folders** (the Pythia layout): sub-folders ``step<N>/`` (also ``step_<N>``,
  ``step-<N>``, ``checkpoint-<N>``) each holding a ``config.json`` and the weights
  (``model.safetensors``, ``pytorch_model.bin`` or their sharded forms). Loaded with
  ``transformers.AutoModel*.from_pretrained(folder, local_files_only=True)`` — never from the network.
* **state_dict files**: ``*<N>.pt`` / ``*<N>.pth`` / ``*<N>.bin`` (``torch.load`` with
  ``weights_only=True``) or ``*<N>.safetensors``, where ``N`` is the last integer in the file's
  stem (``step_1000.pt``, ``ckpt-1000.safetensors``, ``1000.pt``). The model comes from a
  ``model_factory()`` and the weights are loaded with ``load_state_dict(strict=True)``. A ``.pt``
  file may hold the state_dict itself or a dict with a ``"state_dict"``, ``"model_state_dict"`` or
  ``"model"`` entry.

Steps are the optimizer steps in the names. :class:`CheckpointSeries` discovers the entries without
loading anything; :meth:`CheckpointSeries.load` builds one model; :meth:`CheckpointSeries.iter_models`
yields ``(step, model)`` one at a time (the previous model is released before the next is loaded).
Any failure to read a checkpoint — a missing file, a truncated or corrupt file, a state_dict that
does not fit the model — raises :class:`CheckpointError`, whose message names the file; with
``on_error="skip"`` the iterator records it in :attr:`CheckpointSeries.errors` and goes on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ._validation import check_choice

__all__ = ["Checkpoint", "CheckpointError", "CheckpointSeries", "HF_WEIGHT_FILES", "analyze_checkpoints", "CHECKPOINT_CONVENTION"]

_FOLDER_RE = re.compile(r"^(?:step|checkpoint)[_-]?(\d+)$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_LAST_INT_RE = re.compile(r"(\d+)(?!.*\d)")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HF_CLASSES = ("causal_lm", "model", "masked_lm", "sequence_classification")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read. ``path`` and ``step`` name it; the message says why."""

    def __init__(self, message: str, *, path: Path | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.step = step


@dataclass(frozen=True)
class Checkpoint:
    """One entry of a series: its step, its path and its layout (``"hf"`` or ``"state_dict"``)."""

    step: int
    path: Path
    layout: str


def _hf_auto_class(hf_class: Any) -> Any:
    if not isinstance(hf_class, str):
        return hf_class
    check_choice(hf_class, "hf_class", _HF_CLASSES, owner="CheckpointSeries")
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "model": transformers.AutoModel,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[hf_class]


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"Checkpoint file {path} does not hold a state_dict (a non-empty dict of tensors, or a dict with a "
            f"'state_dict' / 'model_state_dict' / 'model' entry). Got {type(obj).__name__}.",
            path=path,
        )
    return obj


class CheckpointSeries:
    """An ordered, lazily loaded series of checkpoints in ``directory``.

    Parameters
    ----------
    directory:
        The folder holding ``step<N>/`` sub-folders or ``*<N>.pt`` / ``*<N>.safetensors`` files.
    model_factory:
        ``() -> nn.Module`` building an untrained model of the right shape; required for state_dict
        files, unused for Hugging Face folders.
    hf_class:
        For Hugging Face folders: ``"causal_lm"`` (default, ``AutoModelForCausalLM``), ``"model"``,
        ``"masked_lm"``, ``"sequence_classification"``, or any class with ``from_pretrained``.
    device:
        Where the loaded model is moved (default CPU).
    dtype:
        Optional dtype for the loaded model (e.g. ``torch.float32``).
    steps:
        Optional list of steps to keep (e.g. a subsample of a long series). A step named here but
        not present is an error at construction.
    strict:
        ``load_state_dict(strict=...)`` for state_dict files.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        model_factory: Callable[[], nn.Module] | None = None,
        *,
        hf_class: Any = "causal_lm",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        steps: list[int] | None = None,
        strict: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.model_factory = model_factory
        self.hf_class = hf_class
        self.device = torch.device(device)
        self.dtype = dtype
        self.strict = strict
        self.errors: list[CheckpointError] = []
        if not self.directory.is_dir():
            raise FileNotFoundError(
                f"The 'directory' parameter of CheckpointSeries must be an existing folder. Got {str(directory)!r}."
            )
        if model_factory is not None and not callable(model_factory):
            raise TypeError(
                f"The 'model_factory' parameter of CheckpointSeries must be a callable returning an nn.Module. "
                f"Got {type(model_factory).__name__} instead."
            )
        if isinstance(hf_class, str):
            check_choice(hf_class, "hf_class", _HF_CLASSES, owner="CheckpointSeries")
        entries = self._discover()
        if steps is not None:
            have = {c.step: c for c in entries}
            missing = [s for s in steps if s not in have]
            if missing:
                raise CheckpointError(
                    f"Checkpoint(s) for step(s) {missing} are missing from {self.directory} "
                    f"(expected e.g. {self.directory / f'step{missing[0]}'}); present: {self._steps_text(entries)}.",
                    path=self.directory / f"step{missing[0]}",
                    step=missing[0],
                )
            entries = [have[s] for s in sorted(set(steps))]
        self.checkpoints: list[Checkpoint] = entries
        if self.layout == "state_dict" and model_factory is None:
            raise ValueError(
                f"The 'model_factory' parameter of CheckpointSeries is required for state_dict files "
                f"(found {len(entries)} in {self.directory}). Got None."
            )

    # -- discovery -------------------------------------------------------------------------------
    @staticmethod
    def _steps_text(entries: list[Checkpoint]) -> str:
        s = [c.step for c in entries]
        if len(s) <= 8:
            return str(s)
        return f"[{s[0]}, {s[1]}, {s[2]}, …, {s[-1]}] ({len(s)} checkpoints)"

    def _discover(self) -> list[Checkpoint]:
        folders: list[Checkpoint] = []
        files: list[Checkpoint] = []
        for entry in self.directory.iterdir():
            if entry.is_dir():
                m = _FOLDER_RE.match(entry.name)
                if m:
                    folders.append(Checkpoint(int(m.group(1)), entry, "hf"))
            elif entry.is_file() and entry.suffix in _FILE_SUFFIXES:
                m = _LAST_INT_RE.search(entry.stem)
                if m:
                    files.append(Checkpoint(int(m.group(1)), entry, "state_dict"))
        if folders and files:
            raise ValueError(
                f"{self.directory} mixes checkpoint folders ({folders[0].path.name}, …) and state_dict files "
                f"({files[0].path.name}, …); put each series in its own directory."
            )
        entries = sorted(folders or files, key=lambda c: c.step)
        if not entries:
            raise FileNotFoundError(
                f"No checkpoints in {self.directory}: expected folders 'step<N>/' (Hugging Face) or files "
                f"'*<N>.pt' / '*<N>.safetensors' (state_dicts)."
            )
        for a, b in zip(entries, entries[1:]):
            if a.step == b.step:
                raise ValueError(f"Two checkpoints in {self.directory} have step {a.step}: {a.path.name} and {b.path.name}.")
        return entries

    # -- access ----------------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """``"hf"`` or ``"state_dict"``."""
        return self.checkpoints[0].layout

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __repr__(self) -> str:
        return f"CheckpointSeries({str(self.directory)!r}, layout={self.layout!r}, steps={self._steps_text(self.checkpoints)})"

    def checkpoint(self, step: int) -> Checkpoint:
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise CheckpointError(
            f"No checkpoint for step {step} in {self.directory}; present: {self._steps_text(self.checkpoints)}.",
            path=self.directory / f"step{step}",
            step=step,
        )

    def load(self, step_or_checkpoint: int | Checkpoint) -> nn.Module:
        """Build the model of one checkpoint (eval mode, on ``device``). Raises :class:`CheckpointError`."""
        ckpt = step_or_checkpoint if isinstance(step_or_checkpoint, Checkpoint) else self.checkpoint(step_or_checkpoint)
        try:
            model = self._load_hf(ckpt) if ckpt.layout == "hf" else self._load_state_dict(ckpt)
        except CheckpointError as e:
            if e.step is None:
                e.step = ckpt.step
            if e.path is None:
                e.path = ckpt.path
            raise
        if self.dtype is not None:
            model = model.to(self.dtype)
        return model.to(self.device).eval()

    def _load_hf(self, ckpt: Checkpoint) -> nn.Module:
        folder = ckpt.path
        if not folder.is_dir():
            raise CheckpointError(f"Checkpoint folder {folder} (step {ckpt.step}) is missing.", path=folder, step=ckpt.step)
        config = folder / "config.json"
        if not config.is_file():
            raise CheckpointError(
                f"Checkpoint folder {folder} (step {ckpt.step}) has no config.json: {config} is missing.",
                path=config,
                step=ckpt.step,
            )
        weights = [folder / w for w in HF_WEIGHT_FILES if (folder / w).is_file()]
        if not weights:
            raise CheckpointError(
                f"Checkpoint folder {folder} (step {ckpt.step}) holds no weights file "
                f"(expected one of {', '.join(HF_WEIGHT_FILES)}).",
                path=folder / HF_WEIGHT_FILES[0],
                step=ckpt.step,
            )
        cls = _hf_auto_class(self.hf_class)
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, SafetensorError, ...
            raise CheckpointError(
                f"Could not load the Hugging Face checkpoint {weights[0]} (step {ckpt.step}): {type(e).__name__}: {e}",
                path=weights[0],
                step=ckpt.step,
            ) from e

    def read_state_dict(self, step_or_checkpoint: int | Checkpoint) -> dict[str, torch.Tensor]:
        """The raw state_dict of a state_dict-file checkpoint (on CPU). Raises :class:`CheckpointError`."""
        ckpt = step_or_checkpoint if isinstance(step_or_checkpoint, Checkpoint) else self.checkpoint(step_or_checkpoint)
        path = ckpt.path
        if not path.is_file():
            raise CheckpointError(f"Checkpoint file {path} (step {ckpt.step}) is missing.", path=path, step=ckpt.step)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj: Any = load_file(str(path), device="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"Could not read checkpoint file {path} (step {ckpt.step}); it is corrupt or not a "
                f"{path.suffix} checkpoint: {type(e).__name__}: {e}",
                path=path,
                step=ckpt.step,
            ) from e
        return _unwrap_state_dict(obj, path)

    def _load_state_dict(self, ckpt: Checkpoint) -> nn.Module:
        sd = self.read_state_dict(ckpt)
        assert self.model_factory is not None  # checked in __init__
        model = self.model_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"The 'model_factory' of CheckpointSeries must return an nn.Module. Got {type(model).__name__}.")
        try:
            model.load_state_dict(sd, strict=self.strict)
        except RuntimeError as e:
            raise CheckpointError(
                f"The state_dict in {ckpt.path} (step {ckpt.step}) does not fit the model from model_factory: {e}",
                path=ckpt.path,
                step=ckpt.step,
            ) from e
        return model

    def iter_models(self, on_error: str = "raise") -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(step, model)`` in step order, one model in memory at a time.

        ``on_error="raise"`` (default) raises the first :class:`CheckpointError`; ``"skip"`` appends it
        to :attr:`errors`, warns, and goes on with the next checkpoint.
        """
        check_choice(on_error, "on_error", ("raise", "skip"), owner="CheckpointSeries.iter_models")
        import warnings

        self.errors = []
        for ckpt in self.checkpoints:
            try:
                model = self.load(ckpt)
            except CheckpointError as e:
                if on_error == "raise":
                    raise
                self.errors.append(e)
                warnings.warn(f"dimscope: skipped a checkpoint: {e}", RuntimeWarning, stacklevel=2)
                continue
            yield ckpt.step, model
            del model  # reference counting frees it now (gc.collect() per checkpoint costs more than it gains)


# --- analysing a series -----------------------------------------------------------------------------

#: The convention name under which checkpoint geometry is stored (a fixed probe set, centered).
CHECKPOINT_CONVENTION = "probe/centered"


def analyze_checkpoints(
    series: CheckpointSeries,
    features: Callable[[nn.Module], tuple[Mapping[str, Any], Any]] | None = None,
    *,
    probe_inputs: Any = None,
    layers: Any = None,
    max_rows: int | None = 4096,
    targets: Any = None,
    split: Any = None,
    probe_kind: str = "ridge",
    probe_alpha: float = 1e-3,
    behaviour: Callable[[nn.Module, Any], Mapping[str, float] | float] | None = None,
    store: Any = None,
    metrics: Any = None,
    store_spectra: bool = True,
    on_error: str = "skip",
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Measure every checkpoint of ``series`` on a fixed probe set; one model in memory at a time.

    For each checkpoint (in step order):

    * **geometry** — per layer, the centered spectrum of the layer's feature matrix and every
      dimscope metric of it (``metrics``: names or name → params, default all), stored with
      ``space="activation"``, ``convention="probe/centered"``;
    * **probes** — if ``targets`` is given: a :class:`dimscope.probes.LinearProbe` per layer fitted on
      ``split.train`` rows and scored on ``split.test`` rows (the same split at every checkpoint),
      stored as metric ``"probe_acc"`` (held-out) and ``"probe_train_acc"`` of that layer;
    * **behaviour** — ``behaviour(model, outputs)`` → a float (stored as ``"behaviour"``) or a dict of
      named floats, stored as training scalars (layer ``""``).

    Features come either from ``features(model) -> ({layer: (n, d) tensor}, outputs)`` — the way to
    choose a token position — or, by default, from one forward of ``probe_inputs`` with hooks on
    ``layers`` (module paths), each output turned into rows by :func:`dimscope.capture.to_features`
    ((B, T, D) → every token a row); then ``outputs`` is the model's output.

    A checkpoint that cannot be read is reported (a warning, an ``"alert"`` event with the file named
    in the message, the manifest's ``"checkpoint_errors"``) and skipped, and the rest of the series is
    analysed (``on_error="skip"``, default); ``on_error="raise"`` stops at it.

    Returns the long DataFrame of everything measured (step, layer, metric, value, space, convention).
    """
    import time as _time

    import numpy as np

    from .capture import capture, to_features
    from .metrics import DEFINITIONS, check_metric_spec, compute_metrics, metric_params
    from .probes import LinearProbe, ProbeSplit, _as_np
    from .spectrum import NonFiniteError, spectrum

    check_choice(on_error, "on_error", ("raise", "skip"), owner="analyze_checkpoints")
    if not isinstance(series, CheckpointSeries):
        raise TypeError(f"The 'series' parameter of analyze_checkpoints must be a CheckpointSeries. Got {type(series).__name__}.")
    if features is None and probe_inputs is None:
        raise ValueError("analyze_checkpoints needs either 'features' (a function of the model) or 'probe_inputs' with 'layers'. Got neither.")
    if features is None and layers is None:
        raise ValueError("The 'layers' parameter of analyze_checkpoints is required with 'probe_inputs'. Got None.")
    y = None
    if targets is not None:
        y = np.asarray(targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else targets).reshape(-1)
        if not isinstance(split, ProbeSplit):
            raise TypeError(
                "The 'split' parameter of analyze_checkpoints must be a ProbeSplit (dimscope.probes.probe_split) when "
                f"'targets' is given. Got {type(split).__name__}."
            )
        if split.n != len(y):
            raise ValueError(f"The 'split' covers {split.n} rows but 'targets' has {len(y)}.")
    metric_spec = check_metric_spec(metrics, owner="analyze_checkpoints")
    params = metric_params(metric_spec) or None
    conv = CHECKPOINT_CONVENTION

    def default_features(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
        from .tracker import call_on_probe, input_placement

        with torch.no_grad(), capture(model, layers) as cap:  # the inputs follow the model's device (and dtype)
            out = call_on_probe(model, probe_inputs, *input_placement(model))
        return {n: to_features(t, max_rows=max_rows) for n, t in cap.outputs.items()}, out

    feat_fn = features or default_features
    if store is not None:
        store.set_manifest(
            {
                "source": "checkpoints",
                "checkpoint_dir": str(series.directory),
                "checkpoint_layout": series.layout,
                "checkpoint_steps": series.steps,
                "default_convention": conv,
                "conventions": ["centered"],
                "modes": ["probe"],
                "metrics": metric_spec,
                "metric_definitions": {k: DEFINITIONS[k] for k in metric_spec},
                "probe_split": None if y is None else {"key": split.key(), "n_train": len(split.train), "n_test": len(split.test), "seed": split.seed},
                "probe_kind": probe_kind if y is not None else None,
            }
        )
    all_rows: list[tuple[int, float, str, str, float, str, str]] = []
    layer_names: list[str] = []
    n_total = len(series)
    done = 0
    for step, model in series.iter_models(on_error=on_error):
        now = _time.time()
        feats, outputs = feat_fn(model)
        rows: list[tuple[int, float, str, str, float, str, str]] = []
        measured = []
        for name, X in feats.items():
            if name not in layer_names:
                layer_names.append(name)
            X = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
            try:
                spec = spectrum(X, center=True)
                vals = compute_metrics(spec, metric_spec)
            except NonFiniteError:
                spec, vals = None, {m: float("nan") for m in metric_spec}
            rows += [(step, now, name, m, float(v), "activation", conv) for m, v in vals.items()]
            measured.append((step, now, name, "activation", conv, X.shape[0], X[0].numel() if len(X) else 0, True, params))
            if store is not None and spec is not None and store_spectra:
                store.add_spectrum(step, now, name, spec, space="activation", convention=conv)
            if y is not None:
                if len(X) != len(y):
                    raise ValueError(f"Layer {name!r} gives {len(X)} feature rows but 'targets' has {len(y)}; they must match.")
                Xn = _as_np(X)
                probe = LinearProbe(kind=probe_kind, alpha=probe_alpha).fit(Xn[split.train], y[split.train])
                rows.append((step, now, name, "probe_acc", probe.score(Xn[split.test], y[split.test]), "activation", conv))
                rows.append((step, now, name, "probe_train_acc", probe.score(Xn[split.train], y[split.train]), "activation", conv))
        if behaviour is not None:
            b = behaviour(model, outputs)
            items = {"behaviour": b} if not isinstance(b, Mapping) else dict(b)
            rows += [(step, now, "", str(k), float(v), "training", "") for k, v in items.items()]
        if store is not None:
            store.add_scalars(rows)
            store.add_measured(measured)
            store.measurement_done()
        all_rows += rows
        del model, feats, outputs
        done += 1
        if progress is not None:
            progress(step, n_total)
    for err in series.errors:
        if store is not None:
            store.add_event(err.step, "alert", payload={"alert": "checkpoint_error", "message": str(err)})
    if store is not None:
        store.set_manifest({"layers": layer_names, "checkpoint_errors": [str(e) for e in series.errors]})
        store.commit()
    return pd.DataFrame(all_rows, columns=["step", "wall_time", "layer", "metric", "value", "space", "convention"])
