"""Matrix-free spectrum of the training Jacobian: never forms the n x n matrix.

``J v`` is one forward-mode pass of a tangent through the recorded run and ``J^T u`` one reverse
pass of an adjoint over the checkpointed trajectory (:class:`UnrolledTraining`), each costing
about one HVP per step. Memory: the trajectory (one parameter vector and optimizer state per step)
plus a few vectors.

* :func:`top_singular` -- top-k singular triplets with SciPy's ``svds`` on a ``LinearOperator``
  (ARPACK Lanczos by default, or LOBPCG, which works in blocks of k vectors).
* :func:`bulk_size_slq` -- stochastic Lanczos quadrature on ``J^T J``: m Lanczos steps from each of
  p Rademacher probes (run as one block), Gauss quadrature nodes ``theta_j`` and weights
  ``w_j = (e_1 . q_j)^2`` give the spectral density; the number of singular values in
  ``[1 - tau, 1 + tau]`` is estimated by ``n * mean_probes sum_j w_j 1[(1-tau)^2 <= theta_j <= (1+tau)^2]``,
  with the standard error over probes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .._validation import check_choice, check_float, check_int
from .core import UnrolledTraining

__all__ = ["jacobian_operator", "top_singular", "TopSingular", "bulk_size_slq", "BulkEstimate"]


def jacobian_operator(run: UnrolledTraining):  # noqa: ANN201
    """A SciPy ``LinearOperator`` for J (float64 on the SciPy side, the run's dtype inside)."""
    from scipy.sparse.linalg import LinearOperator

    n = run.n
    counts = {"jvp": 0, "vjp": 0}

    def mm(V: np.ndarray) -> np.ndarray:
        V = np.asarray(V).reshape(n, -1)
        counts["jvp"] += V.shape[1]
        return run.jvp(torch.from_numpy(np.ascontiguousarray(V.T))).double().cpu().numpy().T

    def rmm(U: np.ndarray) -> np.ndarray:
        U = np.asarray(U).reshape(n, -1)
        counts["vjp"] += U.shape[1]
        return run.vjp(torch.from_numpy(np.ascontiguousarray(U.T))).double().cpu().numpy().T

    op = LinearOperator(
        (n, n), matvec=lambda v: mm(v)[:, 0], rmatvec=lambda u: rmm(u)[:, 0], matmat=mm, rmatmat=rmm, dtype=np.float64
    )
    op.counts = counts  # type: ignore[attr-defined]
    return op


@dataclass
class TopSingular:
    """Top-k singular triplets (descending) and the cost of computing them."""

    values: np.ndarray
    U: np.ndarray
    Vh: np.ndarray
    n_jvp: int
    n_vjp: int
    seconds: float


def top_singular(
    run: UnrolledTraining, k: int = 20, *, solver: str = "lobpcg", tol: float = 1e-5, maxiter: int | None = None, seed: int = 0
) -> TopSingular:
    """Top-``k`` singular values/vectors of J by ``scipy.sparse.linalg.svds`` (matrix-free).

    ``solver="lobpcg"`` (default) works on blocks of k vectors, so every pass through the training
    carries k tangents at once (the per-step cost is then dominated by the GEMMs, not by Python);
    ``"arpack"`` (implicitly restarted Lanczos) is single-vector and needs fewer passes in total but
    each pass is a full sequential run.
    """
    from scipy.sparse.linalg import svds

    k = check_int(k, "k", min_value=1, owner="top_singular")
    check_choice(solver, "solver", ("arpack", "lobpcg", "propack"), owner="top_singular")
    if k >= run.n:
        raise ValueError(f"The 'k' parameter of top_singular must be < n = {run.n}. Got {k} instead.")
    op = jacobian_operator(run)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(run.n) if solver != "lobpcg" else None
    t = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LOBPCG's "not reaching the requested tolerance"
        U, s, Vh = svds(op, k=k, solver=solver, tol=tol, v0=v0, maxiter=maxiter, random_state=seed)
    order = np.argsort(s)[::-1]
    return TopSingular(s[order], U[:, order], Vh[order], op.counts["jvp"], op.counts["vjp"], time.perf_counter() - t)


@dataclass
class BulkEstimate:
    """SLQ estimate of the number of singular values with |sigma - 1| <= tau."""

    tau: float
    bulk: float
    stderr: float
    n: int
    probes: int
    lanczos_steps: int
    seconds: float

    @property
    def share(self) -> float:
        return self.bulk / self.n


def bulk_size_slq(
    run: UnrolledTraining, tau: float = 0.1, *, probes: int = 8, steps: int = 60, seed: int = 0
) -> BulkEstimate:
    """Estimate the bulk size by stochastic Lanczos quadrature on ``J^T J`` (see module doc).

    Full reorthogonalization is used (the Krylov bases are small: probes x steps vectors).
    """
    from scipy.linalg import eigh_tridiagonal

    tau = check_float(tau, "tau", low=0.0, low_inclusive=False, owner="bulk_size_slq")
    probes = check_int(probes, "probes", min_value=1, owner="bulk_size_slq")
    steps = check_int(steps, "steps", min_value=2, owner="bulk_size_slq")
    n = run.n
    steps = min(steps, n)
    g = torch.Generator().manual_seed(seed)
    Z = (torch.randint(0, 2, (probes, n), generator=g).double() * 2 - 1) / np.sqrt(n)
    t0 = time.perf_counter()
    Q = torch.zeros(steps, probes, n, dtype=torch.float64)
    alpha = torch.zeros(probes, steps, dtype=torch.float64)
    beta = torch.zeros(probes, steps, dtype=torch.float64)
    q = Z
    for j in range(steps):
        Q[j] = q
        w = run.vjp(run.jvp(q.to(run.dtype))).double().cpu()
        alpha[:, j] = (w * q).sum(1)
        # full reorthogonalization against all previous vectors of the same probe
        coef = torch.einsum("jpn,pn->jp", Q[: j + 1], w)
        w = w - torch.einsum("jp,jpn->pn", coef, Q[: j + 1])
        b = w.norm(dim=1)
        beta[:, j] = b
        q = w / b.clamp_min(1e-300).unsqueeze(1)
    lo, hi = (1 - tau) ** 2, (1 + tau) ** 2
    per_probe = []
    for p in range(probes):
        theta, S = eigh_tridiagonal(alpha[p].numpy(), beta[p, :-1].numpy())
        wts = S[0] ** 2
        per_probe.append(n * wts[(theta >= lo) & (theta <= hi)].sum())
    est = np.asarray(per_probe)
    return BulkEstimate(
        tau, float(est.mean()), float(est.std(ddof=1) / np.sqrt(probes)) if probes > 1 else float("nan"),
        n, probes, steps, time.perf_counter() - t0,
    )
