"""The training Jacobian ``J = d theta_final / d theta_0`` through a whole unrolled training run.

Forward mode: a block of K tangent vectors ``(dtheta, dstate)`` is carried through every step,

    dg_t = H_t dtheta_t                       (Hessian-vector products, see ``hvp.py``)
    (dtheta_{t+1}, dstate_{t+1}) = d update(theta_t, g_t, state_t) . (dtheta_t, dg_t, dstate_t)

starting from ``dtheta_0 = V`` (columns of the identity for the dense Jacobian), ``dstate_0 = 0``
(the optimizer state starts at zero and does not depend on theta_0). After the last step,
``dtheta_T = V J^T`` in the row-block layout used here. Reverse mode (``J^T u``) runs the adjoint
recursion backwards over the recorded trajectory (every step is a checkpoint).
The optimizer step is element-wise: for SGD it is linear and its tangent is the update applied to
the tangents; otherwise ``torch.func.jvp``/``vjp`` of the update are used.

Memory is bounded by ``chunk``: K tangents at a time, each chunk through the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from .._validation import check_float, check_int
from .hvp import GenericHVP, MLPHVP, make_hvp
from .training import (
    FunctionalOptimizer,
    ParamSpec,
    TrainConfig,
    Trajectory,
    functional_train,
    make_optimizer,
)

__all__ = ["TrainingJacobian", "Regions", "training_jacobian", "UnrolledTraining"]


class UnrolledTraining:
    """A recorded training run that can push tangents forward (JVP) and adjoints backward (VJP).

    ``jvp(V)`` returns ``V @ J^T`` for a (K, n) block V (i.e. row k is ``J v_k``); ``vjp(U)`` returns
    ``U @ J`` (row k is ``J^T u_k``).
    """

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        cfg: TrainConfig,
        *,
        dtype: torch.dtype = torch.float32,
        method: str = "auto",
        theta0: torch.Tensor | None = None,
        cache: bool = True,
    ) -> None:
        self.cfg = cfg.validated(len(X))
        self.spec = ParamSpec(model)
        self.dtype = dtype
        self.device = self.spec.device  # the run is carried out where the model is; see training_jacobian
        self.X = X.to(device=self.device, dtype=dtype)
        self.y = y.to(device=self.device, dtype=dtype) if y.is_floating_point() else y.to(self.device)
        self.opt: FunctionalOptimizer = make_optimizer(self.cfg)
        self.hvp_op: GenericHVP | MLPHVP = make_hvp(model, self.spec, self.cfg.loss, method)
        t0 = time.perf_counter()
        self.traj: Trajectory = functional_train(model, X, y, self.cfg, dtype=dtype, theta0=theta0)
        self.primal_seconds = time.perf_counter() - t0
        self.n = self.spec.n
        self.n_steps = len(self.traj.lrs)
        self._ctx_cache: list[Any] | None = [None] * self.n_steps if cache else None

    @property
    def theta0(self) -> torch.Tensor:
        return self.traj.thetas[0]

    @property
    def theta_final(self) -> torch.Tensor:
        return self.traj.theta_final

    def _batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.traj.batches[t]
        return self.X[idx], self.y[idx]

    def _ctx(self, t: int) -> Any:
        c = self._ctx_cache[t] if self._ctx_cache is not None else None
        if c is None:
            c = self.hvp_op.context(self.traj.thetas[t], *self._batch(t))
            if self._ctx_cache is not None:
                self._ctx_cache[t] = c
        return c

    def _primal_blocks(self, t: int, blocks: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per block: (theta_t, g_t, *state_t) in the block layout, without the tangent axis (0)."""
        vecs = [self.traj.thetas[t], self.hvp_op.gradient(self.traj.thetas[t], *self._batch(t)), *self.traj.states[t]]
        per_vec = [self.hvp_op.to_blocks(v.unsqueeze(0)) for v in vecs]
        return [tuple(pv[j].squeeze(0) for pv in per_vec) for j in range(len(blocks))]

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """Push a (K, n) block of initial-parameter tangents through the run; returns rows ``J v_k``."""
        V = V.to(device=self.device, dtype=self.dtype)
        single = V.dim() == 1
        blocks = self.hvp_op.to_blocks(V.unsqueeze(0) if single else V)
        states = [tuple(torch.zeros_like(b) for _ in range(self.opt.n_state)) for b in blocks]
        upd = self.opt.update
        for t in range(self.n_steps):
            lr = self.traj.lrs[t]
            G = self.hvp_op.hvp_blocks(self._ctx(t), blocks)
            if self.opt.linear:
                for j in range(len(blocks)):
                    blocks[j], states[j] = upd(blocks[j], G[j], states[j], lr, t)
                continue
            prim = self._primal_blocks(t, blocks)

            def f(a: torch.Tensor, b: torch.Tensor, *s: torch.Tensor, lr: float = lr, t: int = t) -> Any:
                return upd(a, b, tuple(s), lr, t)

            for j in range(len(blocks)):
                pj = prim[j]
                tan = vmap(lambda *d, pj=pj: jvp(f, pj, d)[1], in_dims=0, out_dims=0)
                blocks[j], states[j] = tan(blocks[j], G[j], *states[j])
        out = self.hvp_op.from_blocks(blocks)
        return out[0] if single else out

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """Pull a (K, n) block of final-parameter cotangents back through the run; rows ``J^T u_k``."""
        U = U.to(device=self.device, dtype=self.dtype)
        single = U.dim() == 1
        lth = self.hvp_op.to_blocks(U.unsqueeze(0) if single else U)
        lst = [tuple(torch.zeros_like(b) for _ in range(self.opt.n_state)) for b in lth]
        upd = self.opt.update
        for t in reversed(range(self.n_steps)):
            lr = self.traj.lrs[t]
            prim = self._primal_blocks(t, lth)

            def f(a: torch.Tensor, b: torch.Tensor, *s: torch.Tensor, lr: float = lr, t: int = t) -> Any:
                new_theta, new_state = upd(a, b, tuple(s), lr, t)
                return (new_theta, *new_state)

            a_g = []
            for j in range(len(lth)):
                _, pull = vjp(f, *prim[j])
                cots = vmap(pull, in_dims=0, out_dims=0)((lth[j], *lst[j]))
                lth[j], lst[j] = cots[0], tuple(cots[2:])
                a_g.append(cots[1])
            HG = self.hvp_op.hvp_blocks(self._ctx(t), a_g)
            lth = [a + h for a, h in zip(lth, HG)]
        out = self.hvp_op.from_blocks(lth)
        return out[0] if single else out

    def dense(self, chunk: int | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The dense n x n Jacobian, ``chunk`` tangent columns at a time (default 64: the block stays in
        cache and the GEMMs are already efficient; memory is O(chunk * n))."""
        n = self.n
        if chunk is None:
            chunk = min(n, 64)
        chunk = check_int(chunk, "chunk", min_value=1, owner="training_jacobian")
        JT = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            V = torch.zeros(e - s, n, dtype=self.dtype, device=self.device)
            V[torch.arange(e - s), torch.arange(s, e)] = 1.0
            JT[s:e] = self.jvp(V)
            if progress is not None:
                progress(e, n)
        return JT.T


@dataclass
class Regions:
    """Chaotic (sigma > 1 + tau), bulk (|sigma - 1| <= tau) and stable (sigma < 1 - tau) index sets."""

    tau: float
    chaotic: np.ndarray
    bulk: np.ndarray
    stable: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        return {"chaotic": len(self.chaotic), "bulk": len(self.bulk), "stable": len(self.stable)}

    @property
    def bulk_share(self) -> float:
        n = len(self.chaotic) + len(self.bulk) + len(self.stable)
        return len(self.bulk) / n


def regions_of(sigma: np.ndarray, tau: float) -> Regions:
    tau = check_float(tau, "tau", low=0.0, low_inclusive=False, owner="regions")
    s = np.asarray(sigma)
    return Regions(
        tau,
        np.flatnonzero(s > 1 + tau),
        np.flatnonzero(np.abs(s - 1) <= tau),
        np.flatnonzero(s < 1 - tau),
    )


@dataclass
class TrainingJacobian:
    """``J[i, j] = d theta_final[i] / d theta_0[j]``, rows and columns in ``parameters_to_vector`` order.

    The SVD ``J = U diag(sigma) Vh`` (sigma descending) is computed on first access, in float64 when
    ``J`` is float64 and in float32 otherwise.
    """

    J: torch.Tensor
    theta0: torch.Tensor
    theta_final: torch.Tensor
    config: TrainConfig | None = None
    method: str = ""
    seconds: float = float("nan")
    losses: list[float] = field(default_factory=list)
    _svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def _ensure_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._svd is None:
            try:
                self._svd = torch.linalg.svd(self.J, full_matrices=False)
            except torch.linalg.LinAlgError:
                # gesdd (divide and conquer) can fail on matrices with many (nearly) repeated singular
                # values -- J has hundreds exactly at 1; fall back to the QR-iteration driver in float64.
                from scipy.linalg import svd

                U, s, Vh = svd(self.J.double().numpy(), full_matrices=False, lapack_driver="gesvd")
                self._svd = tuple(torch.from_numpy(a).to(self.J.dtype) for a in (U, s, Vh))  # type: ignore[assignment]
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self._ensure_svd()[0]

    @property
    def singular_values(self) -> torch.Tensor:
        return self._ensure_svd()[1]

    @property
    def Vh(self) -> torch.Tensor:
        return self._ensure_svd()[2]

    @property
    def n(self) -> int:
        return self.J.shape[0]

    def regions(self, tau: float = 0.1) -> Regions:
        """Index sets (into the descending singular values) of the three regions at threshold ``tau``."""
        return regions_of(self.singular_values.double().numpy(), tau)

    def alignment(self) -> np.ndarray:
        """``cos(u_i, v_i) = u_i . v_i`` for every singular pair (1 when J maps v_i onto itself)."""
        U, _, Vh = self._ensure_svd()
        return (U * Vh.T).sum(0).double().numpy()


def training_jacobian(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: str = "sgd",
    lr: Any = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    schedule: Any = "cosine",
    batch_size: int = 64,
    epochs: int = 25,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = True,
    loss: Any = "cross_entropy",
    dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
    method: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> TrainingJacobian:
    """The dense training Jacobian of ``model`` trained from its current parameters on (X, y).

    ``method="auto"`` uses the closed-form fast path for ``Sequential(Linear, activation, Linear)``
    with cross-entropy or MSE, and ``vmap(jvp(grad))`` otherwise (``"generic"`` forces it).
    The model is not modified. The training and the tangents run on the model's device (X and y are
    moved there); ``J``, ``theta0`` and ``theta_final`` come back on the CPU, where the SVD is taken.
    See :mod:`dimscope.jacobian.training` for the optimizer conventions.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"The 'dtype' parameter of training_jacobian must be torch.float32 or torch.float64. Got {dtype!r} instead.")
    cfg = TrainConfig(
        optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, betas=tuple(betas), eps=eps,
        weight_decay=weight_decay, schedule=schedule, batch_size=batch_size, epochs=epochs, shuffle=shuffle,
        seed=seed, drop_last=drop_last, loss=loss,
    )
    t0 = time.perf_counter()
    run = UnrolledTraining(model, X, y, cfg, dtype=dtype, method=method)
    J = run.dense(chunk=chunk, progress=progress)
    # the run goes where the model is (an accelerator included); the result, and its SVD, on the CPU
    return TrainingJacobian(
        J=J.cpu(), theta0=run.theta0.cpu(), theta_final=run.theta_final.cpu(), config=cfg, method=run.hvp_op.name,
        seconds=time.perf_counter() - t0, losses=run.traj.losses,
    )
