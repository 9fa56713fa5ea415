"""The Tracker under ``torch.distributed`` (DDP, FSDP): one spectrum per layer from every rank's rows.

::

    tracker = DistributedTracker(model, probe=X_probe, every=5, run="runs/ddp")   # on every rank
    tracker.step(step, loss=loss.item())                                          # on every rank, same steps

How it works
------------
* Every rank passes the **same full probe**; rank r measures the contiguous slice
  ``[r*n/W, (r+1)*n/W)`` of it, so the probe forward is split across the W ranks. Under FSDP the
  forward needs every rank anyway; under DDP the split divides the cost.
* For each layer, rank r holds its feature rows X_r (n_r × d). The ranks all-reduce (sum) the
  sufficient statistics, in float64: first Σ_r n_r and Σ_r 1ᵀX_r (so the global mean μ is exact),
  then the centered Gram Σ_r (X_r − μ)ᵀ(X_r − μ) (or Σ_r X_rᵀX_r uncentered). One
  eigendecomposition of that d × d matrix (:func:`dimscope.spectrum.spectrum_from_gram`) gives
  the spectrum of the stacked probe — the same values a single process gets on the whole probe.
  When the probe has no more rows than the layer has features (n ≤ d), the ranks all-gather the
  rows instead (n·d numbers rather than d², and an n × n eigenproblem, as in one process).
* Collectives must run in lockstep on every rank, so measurement is synchronous
  (``background=False`` is forced) and runs on the training thread; every rank must call
  :meth:`~dimscope.Tracker.step` with the same step numbers (``force=True`` on every rank or none).
* Rank 0 alone writes the run store and runs the ``extensions`` (sinks, alerts); every rank gets the
  measured values back from :meth:`~dimscope.Tracker.step`.

Limits
------
* ``max_rows`` is a cap per rank (``max_rows // world_size`` rows each), and rows are subsampled
  within each rank's slice — equal to one process only when no subsampling happens.
* Training scalars (the loss) are those passed on rank 0; pass an all-reduced loss to record the
  global one.
* Weight spectra and ``grad_norm`` read the local parameters: right under DDP (replicated), not
  under FSDP, where parameters are sharded — there they are switched off with a warning. With FSDP1
  the module paths gain ``_fsdp_wrapped_module.``; FSDP2 (``fully_shard``) keeps them. Activations
  are complete under both: FSDP gathers the parameters in the forward, which runs on every rank.
* Communication per layer and convention per measurement is min(d², n·d) float64 numbers (a
  4096-wide layer with 8192 probe rows: 128 MiB).
* NCCL needs CUDA tensors: the statistics are reduced on the current CUDA device there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..spectrum import NonFiniteError, Spectrum, _gram_underflowed, _underflow_error, spectrum, spectrum_from_gram
from ..tracker import Tracker, TrackerExtension, _probe_len, _slice_probe

__all__ = ["DistributedTracker", "shard_bounds"]


def tracker_for(model: nn.Module, probe: Any, world_size: int, **kwargs: Any) -> Tracker:
    """A :class:`DistributedTracker` when a process group of several ranks is up, else a Tracker."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        return DistributedTracker(model, probe, **kwargs)
    return Tracker(model, probe, **kwargs)


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous slice ``[a, b)`` of ``n`` probe rows that ``rank`` measures (sizes differ by ≤ 1)."""
    base, extra = divmod(n, world_size)
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def _has_sharded_parameters(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2 ``fully_shard``) or FSDP1 flattens them."""
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


class DistributedTracker(Tracker):
    """A :class:`~dimscope.Tracker` whose spectra are reduced across the ranks of a process group.

    Takes the Tracker's parameters (see :class:`dimscope.Tracker`) plus ``group`` (a process group,
    default the world). ``run`` and ``extensions`` are used on rank 0 only; ``background`` is
    ignored (measurement is synchronous) when a process group is initialized. See the module
    docstring for the algorithm and its limits. When ``torch.distributed`` is not initialized it
    behaves exactly as a :class:`~dimscope.Tracker`.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Any = None,
        *,
        group: Any = None,
        run: str | None = None,
        extensions: Sequence[TrackerExtension] = (),
        max_rows: int | None = 4096,
        background: bool = True,
        **kwargs: Any,
    ) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        if self.distributed and max_rows is not None:
            max_rows = max(2, max_rows // self.world_size)
        is_zero = self.rank == 0
        if self.distributed and probe is not None and _probe_len(probe) < self.world_size:
            raise ValueError(
                f"The 'probe' parameter of DistributedTracker must hold at least one sample per rank "
                f"(world size {self.world_size}). Got {_probe_len(probe)} samples."
            )
        self.sharded_parameters = _has_sharded_parameters(model)
        self._check_extensions(extensions)  # on every rank, before any collective: all of them stop
        # extensions run on rank 0; a stop one of them requests (StopOnAlert) must reach every rank, or
        # the others would wait in the next collective: each rank keeps its own copies to pass it to
        self._stoppers = [e for e in extensions if getattr(e, "syncs_stop", False)]
        self._sync_stop = False
        if self.distributed and self.world_size > 1:  # one collective: any rank's stopper turns the per-step sync on for all
            self._flag_device = self._reduce_device(torch.empty(0))  # where the stop flag is all-reduced
            n = torch.tensor([len(self._stoppers)], device=self._flag_device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
            self._sync_stop = int(n.item()) > 0
        if self.sharded_parameters:
            for flag in ("weight_metrics", "grad_norm"):
                if kwargs.get(flag, flag == "weight_metrics"):
                    warnings.warn(
                        f"dimscope: the model's parameters are sharded (FSDP / DTensor); '{flag}' reads local "
                        "parameters and is switched off. Activation metrics are unaffected.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                kwargs[flag] = False
        super().__init__(
            model,
            probe,
            run=run if is_zero else None,
            extensions=list(extensions) if is_zero else [],
            max_rows=max_rows,
            background=background and not self.distributed,
            **kwargs,
        )
        self.probe_bounds = (0, _probe_len(probe)) if probe is not None else (0, 0)
        if self.distributed and probe is not None:
            self.probe_bounds = shard_bounds(_probe_len(probe), self.world_size, self.rank)
            self.probe = _slice_probe(probe, *self.probe_bounds)
        if self.store is not None:
            self.store.set_manifest(
                {
                    "distributed": {
                        "world_size": self.world_size,
                        "backend": dist.get_backend(group) if self.distributed else None,
                        "probe_split": "contiguous",
                        "max_rows_per_rank": max_rows,
                        "sharded_parameters": self.sharded_parameters,
                    }
                }
            )
            self.store.commit()

    def _check_extensions(self, extensions: Sequence[TrackerExtension]) -> None:
        """Extensions run on rank 0 only: refuse those whose work would need the other ranks."""
        def named(flag: str) -> list[str]:
            return [getattr(e, "name", type(e).__name__) for e in extensions if getattr(e, flag, False)]

        if not (self.distributed and self.world_size > 1):
            return
        if named("needs_whole_probe"):
            raise ValueError(
                f"The 'extensions' parameter of DistributedTracker cannot hold {named('needs_whole_probe')}: they measure the "
                f"whole probe in one process, and here each of the {self.world_size} ranks holds a share of it. Run them "
                "with a single-process Tracker (an evaluation job, say)."
            )
        if self.sharded_parameters and named("runs_own_forward"):
            raise ValueError(
                f"The 'extensions' parameter of DistributedTracker cannot hold {named('runs_own_forward')} when the "
                "model's parameters are sharded (FSDP / DTensor): they run the model's forward on rank 0 alone, whose "
                "parameter all-gathers the other ranks would never join."
            )

    def add_extension(self, ext: TrackerExtension) -> None:
        self._check_extensions([ext])
        if getattr(ext, "syncs_stop", False) and ext not in self._stoppers:
            if self.distributed and self.world_size > 1 and not self._sync_stop:
                raise ValueError(
                    f"The extension {getattr(ext, 'name', type(ext).__name__)!r} stops training: beside a DistributedTracker it "
                    "must be given at construction (extensions=[...], on every rank), where the ranks agree to pass its stop on."
                )
            self._stoppers.append(ext)
        if self.rank == 0:  # as at construction: extensions live on rank 0
            super().add_extension(ext)

    def step(self, step: int, loss: float | torch.Tensor | None = None, *, force: bool = False,
             **scalars: float | torch.Tensor) -> dict[tuple[str, str], float] | None:
        """As :meth:`dimscope.Tracker.step`; call it on every rank with the same ``step`` (and ``force``)."""
        values = super().step(step, loss, force=force, **scalars)
        if self.rank != 0:
            self.history.clear()  # ranks > 0 keep no store and must not grow a history either
        if self._sync_stop:
            # one int all-reduced per step: rank 0's stop (set within super().step) reaches every rank at the same step
            flag = torch.tensor([int(any(s.should_stop for s in self._stoppers))], device=self._flag_device)
            if int(self._all_reduce(flag).item()) > 0:
                for s in self._stoppers:
                    if not s.should_stop:
                        s.stop()
        return values

    def _reduce_device(self, X: torch.Tensor) -> torch.device:
        if self.distributed and dist.get_backend(self.group) == "nccl" and X.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return X.device

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _all_gather_rows(self, X: torch.Tensor) -> torch.Tensor:
        """Every rank's rows stacked in rank order (ranks may hold different numbers of rows)."""
        counts = [torch.zeros(1, dtype=torch.int64, device=X.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([X.shape[0]], dtype=torch.int64, device=X.device), group=self.group)
        sizes = [int(c.item()) for c in counts]
        padded = X.new_zeros((max(sizes), X.shape[1]))
        padded[: X.shape[0]] = X
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)], 0)

    def features_to_spectrum(self, X: torch.Tensor, center: bool) -> Spectrum:
        """The spectrum of the rows of every rank stacked, from all-reduced float64 statistics.

        With n rows over all ranks and d features: when n > d the ranks all-reduce the d × d Gram
        matrix (centered on the exact global mean); when n <= d they all-gather the n × d rows
        instead, which moves fewer numbers, and the spectrum comes from the n × n Gram exactly as in
        one process (:func:`dimscope.spectrum`). Runs collectives: every rank must call it for the
        same layers in the same order. A NaN or Inf on any rank reaches every rank, so all ranks
        raise :class:`~dimscope.spectrum.NonFiniteError` together.
        """
        if X.ndim != 2:
            raise ValueError(f"DistributedTracker expects 2-D features (samples x features). Got shape {tuple(X.shape)}.")
        if not (self.distributed and self.world_size > 1):
            return super().features_to_spectrum(X, center)
        X = X.detach().to(device=self._reduce_device(X), dtype=torch.float64)
        d = X.shape[1]
        stats = torch.cat([X.sum(0), X.new_tensor([X.shape[0]])])
        self._all_reduce(stats)
        n = int(round(float(stats[-1])))
        if n < 2:
            raise ValueError(f"A distributed spectrum needs at least 2 samples over all ranks. Got {n}.")
        if n <= d:
            return spectrum(self._all_gather_rows(X), center=center)
        if center:
            X = X - stats[:d] / n
            residual = X.sum(0)  # a second pass, as in one process: it removes the first mean's round-off
            self._all_reduce(residual)
            X = X - residual / n
        # the Gram matrix and, in one more number, whether any rank holds a nonzero (centered) value
        flat = torch.cat([(X.T @ X).flatten(), X.ne(0).any().to(X.dtype).reshape(1)])
        self._all_reduce(flat)
        G, nonzero = flat[:-1].reshape(d, d), float(flat[-1]) > 0
        if not torch.isfinite(G).all():
            raise NonFiniteError("The feature matrix holds NaN or Inf values.")
        if nonzero and _gram_underflowed(G):  # as spectrum(): on every rank alike
            raise _underflow_error("feature", center)
        return spectrum_from_gram(G, n, d, centered=center)
