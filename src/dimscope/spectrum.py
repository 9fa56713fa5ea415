"""The eigen-spectrum of a feature matrix: one eigendecomposition, in float64.

Every dimensionality metric in :mod:`dimscope.metrics` is a pure function of a :class:`Spectrum`.

Convention (see the README's metric table): X is an n x d matrix, rows are samples. By default X is
**centered** (the column mean is subtracted) and the spectrum is the eigenvalues of the covariance
C = XᵀX / (n - 1). Uncentered, it is the second-moment matrix XᵀX / n. The eigenvalues are taken
from whichever of XᵀX (d x d) or XXᵀ (n x n) is smaller; both have the same non-zero eigenvalues.
The number of eigenvalues kept is the ceiling m = min(n - 1, d) centered, min(n, d) uncentered.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._validation import check_bool, check_int

__all__ = ["Spectrum", "spectrum", "spectrum_from_gram", "weight_spectrum", "batch_spectra", "top_eigenvalue", "top_eigenvalues", "Moments", "NonFiniteError"]

# Relative size below which a negative eigenvalue is round-off (clamped to 0); beyond it an error.
_NEG_TOL = 1e-9


def ceiling(n_samples: int, n_features: int, centered: bool) -> int:
    """The number of eigenvalues a spectrum has (its largest possible rank): min(n - 1, d)
    centered, min(n, d) uncentered."""
    return max(0, min(int(n_samples) - (1 if centered else 0), int(n_features)))


class NonFiniteError(ValueError):
    """The feature matrix holds NaN or Inf values."""


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a covariance (or second-moment) matrix, descending, float64.

    Attributes
    ----------
    values:
        The eigenvalues λ_1 >= ... >= λ_k >= 0. ``k`` equals :attr:`ceiling` unless the spectrum was
        stored truncated to its top K values (then :attr:`truncated` is True).
    n_samples, n_features:
        The shape of the feature matrix it came from.
    centered:
        Whether the column mean was subtracted.
    trace:
        Σλ over *all* eigenvalues (equals ``values.sum()`` unless truncated).
    """

    values: np.ndarray
    n_samples: int
    n_features: int
    centered: bool = True
    trace: float = field(default=float("nan"))

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "values", v)
        if not np.isfinite(self.trace):
            object.__setattr__(self, "trace", float(v.sum()))

    @property
    def ceiling(self) -> int:
        """The largest possible rank: min(n - 1, d) centered, min(n, d) uncentered."""
        return ceiling(self.n_samples, self.n_features, self.centered)

    @property
    def truncated(self) -> bool:
        """True when only the top K eigenvalues are held: a metric the top K and the trace do not
        determine is then NaN (see :func:`dimscope.metrics.compute_metrics`)."""
        return len(self.values) < self.ceiling

    @property
    def singular_values(self) -> np.ndarray:
        """σ_i = √λ_i."""
        return np.sqrt(self.values)

    def top(self, k: int | None) -> Spectrum:
        """The same spectrum truncated to its top ``k`` eigenvalues (``trace`` keeps the full sum)."""
        if k is None:
            return self
        k = check_int(k, "k", min_value=1, owner="Spectrum.top")
        if k >= len(self.values):
            return self
        return Spectrum(self.values[:k].copy(), self.n_samples, self.n_features, self.centered, self.trace)

    def info(self) -> dict[str, Any]:
        """What is stored beside every metric value."""
        return {
            "n_samples": self.n_samples,
            "n_features": self.n_features,
            "centered": self.centered,
            "ceiling": self.ceiling,
        }


def _as_real_tensor(X: Any, param: str, owner: str, what: str) -> torch.Tensor:
    """``X`` as a real torch tensor (a numpy array shared, or copied when its strides are negative),
    else a TypeError naming ``param`` of ``owner`` (``what`` says what it takes)."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X.copy() if any(st < 0 for st in X.strides) else X)  # torch takes no negative strides
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"The '{param}' parameter of {owner} must be {what}. Got {type(X).__name__}.")
    if X.is_complex():
        raise TypeError(f"The '{param}' parameter of {owner} must be real. Got dtype {X.dtype}.")
    return X


def _as_matrix(X: Any) -> torch.Tensor:
    X = _as_real_tensor(X, "X", "spectrum", "a 2-D torch.Tensor or numpy array")
    if X.ndim != 2:
        raise ValueError(f"The 'X' parameter of spectrum must be 2-D (samples x features). Got shape {tuple(X.shape)}.")
    return X


def _center_(X: torch.Tensor, dim: int) -> torch.Tensor:
    """Subtract the mean along ``dim`` in place, twice: the second pass removes the round-off of the
    first mean (about eps·|mean| per entry, the same in every row: a spurious rank-one covariance that
    made a collapsed float64 layer, identical rows, measure rank 1). Identical rows center to exact zeros."""
    X.sub_(X.mean(dim=dim, keepdim=True))
    return X.sub_(X.mean(dim=dim, keepdim=True))


def _clean_stack(E: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Descending eigenvalues of K size x size symmetric PSD matrices, one row each: round-off
    negatives clamped to 0, values under the float64 round-off level of their matrix set to 0. Also
    returns which rows had a negative eigenvalue too large to be round-off (not PSD)."""
    E = np.array(E, dtype=np.float64, ndmin=2)
    if E.shape[1] == 0:
        return E, np.zeros(E.shape[0], dtype=bool)
    scale = np.maximum(E[:, 0], 0.0)
    most_negative = E.min(axis=1)
    bad = (most_negative < 0) & (-most_negative > _NEG_TOL * np.maximum(scale, 1e-300) * max(size, 1)) & (-most_negative > 1e-12)
    np.clip(E, 0.0, None, out=E)
    E[E < (size * np.finfo(np.float64).eps * scale)[:, None]] = 0.0
    return E, bad


def _not_psd(E: np.ndarray) -> ValueError:
    return ValueError(
        f"The Gram matrix has a large negative eigenvalue ({E.min():.3e}, largest {E.max():.3e}); it is not positive semi-definite."
    )


def _clean_eigenvalues(ev: np.ndarray, size: int) -> np.ndarray:
    """Descending eigenvalues of a size x size symmetric PSD matrix: round-off negatives clamped."""
    E, bad = _clean_stack(ev[None, :], size)
    if bad[0]:
        raise _not_psd(ev)
    return E[0]


def _eigvalsh_desc(G: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric float64 matrix, descending, negatives from round-off clamped."""
    G = 0.5 * (G + G.T)
    return _clean_eigenvalues(torch.linalg.eigvalsh(G).flip(0).cpu().numpy(), G.shape[0])


@dataclass(frozen=True)
class Moments:
    """What the moment metrics need of a covariance, without its eigendecomposition: tr C, tr C² (=
    Σλ² = ‖C‖_F²) and λ_1 (by Lanczos, certified to 1e-10; see :func:`top_eigenvalues`), with the shape it
    came from."""

    trace: float
    sum_sq: float
    top: float
    n_samples: int
    n_features: int
    centered: bool = True
    #: Σ(λ/λ_1)², scaled before squaring (Σλ² itself over- or underflows float64 for activations
    #: beyond about 1e±77); NaN if not computed
    sum_sq_rel: float = float("nan")

    @property
    def ceiling(self) -> int:
        return ceiling(self.n_samples, self.n_features, self.centered)

    def info(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "n_features": self.n_features, "centered": self.centered, "ceiling": self.ceiling}


# Below this size a (stacked) full eigendecomposition costs less than Lanczos's iterations.
_LANCZOS_MIN_SIZE = 160
_LANCZOS_MAX_ITER = 120
_LANCZOS_CHECK = 4  # test for convergence every this many iterations


_BLAS_CONTROLLER: Any = None
_BLAS_LOCK = threading.Lock()
_BLAS_HELD: list[Any] = [0, None]  # how many _one_blas_thread contexts are open, and the limit they share


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """A context in which numpy/scipy's BLAS uses one thread (threads of their own would fight
    torch's OpenMP workers, which spin on the other cores between training ops).

    The BLAS libraries' thread count is process-wide: contexts open at the same time, on any thread,
    share one limit, taken by the first and lifted (the previous setting restored) by the last, so
    that overlapping contexts cannot restore each other's limit.
    """
    global _BLAS_CONTROLLER
    with _BLAS_LOCK:
        if _BLAS_HELD[0] == 0:
            _BLAS_HELD[1] = None
            try:
                if _BLAS_CONTROLLER is None:
                    from threadpoolctl import ThreadpoolController

                    _BLAS_CONTROLLER = ThreadpoolController()
                blas = _BLAS_CONTROLLER.select(user_api="blas")  # BLAS only: torch's OpenMP is per-thread
                if any((i.get("num_threads") or 1) > 1 for i in blas.info()):  # already at one thread: leave it
                    _blas_control_to_this_thread()
                    _BLAS_HELD[1] = blas.limit(limits=1)
                    _blas_control_to_this_thread()  # give control back: other threads' limits keep working
            except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect the libraries
                pass
        _BLAS_HELD[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_HELD[0] -= 1
            held = _BLAS_HELD[1] if _BLAS_HELD[0] == 0 else None
            if held is not None:
                _BLAS_HELD[1] = None
            # put the setting back only if it is still ours (another thread's limit may have replaced it)
            if held is not None and all((i.get("num_threads") or 1) == 1 for i in _BLAS_CONTROLLER.select(user_api="blas").info()):
                _blas_control_to_this_thread()  # the last context may close on another thread than the first
                try:
                    held.restore_original_limits()
                finally:
                    _blas_control_to_this_thread()


def _blas_control_to_this_thread() -> None:
    """threadpoolctl >= 3.8 lets only one thread at a time set OpenBLAS's (process-wide, pthreads)
    thread count and silently ignores the others: hand that control to whichever thread asks next."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - threadpoolctl < 3.8 has no controlling thread
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


# λ_1 from Lanczos is accepted only with a certificate that no eigenvalue exceeds it by this much.
_CERTIFY_RTOL = 1e-10


def _usable_start(start: np.ndarray | None, m: int) -> bool:
    return start is not None and start.shape == (m,) and bool(np.all(np.isfinite(start))) and bool(np.any(start))


def _lanczos_top(G: np.ndarray, start: np.ndarray | None, rtol: float, mix: float = 1e-3) -> tuple[float, np.ndarray] | None:
    """Lanczos with full reorthogonalisation for the top eigenpair, from ``start`` plus ``mix`` of a
    fixed random vector (or the random vector alone); None if not converged."""
    m = G.shape[0]
    k_max = min(m, _LANCZOS_MAX_ITER)
    Q = np.empty((k_max, m))
    alpha = np.empty(k_max)
    beta = np.empty(k_max)
    r = np.random.default_rng(0).standard_normal(m)
    if _usable_start(start, m):
        v = np.asarray(start, dtype=np.float64) / np.linalg.norm(start) + mix * r / np.linalg.norm(r)
    else:
        v = r
    Q[0] = v / np.linalg.norm(v)
    for k in range(k_max):
        w = G @ Q[k]
        alpha[k] = Q[k] @ w
        Qk = Q[: k + 1]
        w -= (Qk @ w) @ Qk  # full reorthogonalisation: the three-term recurrence and its correction
        b = beta[k] = float(np.sqrt(w @ w))
        if k % _LANCZOS_CHECK == _LANCZOS_CHECK - 1 or k == k_max - 1 or b == 0.0:
            T = np.diag(alpha[: k + 1])
            if k:
                i = np.arange(k)
                T[i, i + 1] = T[i + 1, i] = beta[:k]
            theta, S = np.linalg.eigh(T)
            top = float(theta[-1])
            if top <= 0.0:
                return 0.0, Q[0]
            res = abs(b * S[-1, -1])
            gap = top - float(theta[-2]) if k else top
            if b <= 1e-14 * top or min(res, res * res / max(gap, 1e-300)) <= rtol * top:
                return top, S[:, -1] @ Qk
        if k + 1 < k_max:
            Q[k + 1] = w / b
    return None


def _all_below(G: np.ndarray, t: float) -> bool:
    """True when every eigenvalue of the symmetric matrix G is below t: t·I − G is positive definite
    (it has a Cholesky factor). Round-off moves the test by about m·eps·‖G‖, far below the margins
    it is used with."""
    from scipy.linalg import lapack

    A = np.negative(G)
    A.flat[:: G.shape[0] + 1] += t
    with _one_blas_thread():  # scipy's BLAS threads, left spinning, would slow numpy's next LAPACK calls
        _, info = lapack.dpotrf(A.T, lower=False, clean=False, overwrite_a=True)  # A.T: the same matrix, Fortran order
    return info == 0


def _certified_top(G: np.ndarray, start: np.ndarray | None, rtol: float) -> tuple[float, np.ndarray | None]:
    """λ_1 by Lanczos, accepted only when certified: a Ritz value θ never exceeds λ_1, and
    θ·(1 + 1e-10)·I − G positive definite shows λ_1 < θ·(1 + 1e-10). A warm start (with 1e-3 of a
    random vector) is tried first, then a random start; if neither is certified, a full
    eigendecomposition."""
    for s in ((start, None) if _usable_start(start, G.shape[0]) else (None,)):
        got = _lanczos_top(G, s, rtol)
        if got is not None and got[0] > 0 and _all_below(G, got[0] * (1.0 + _CERTIFY_RTOL)):
            return got
    return float(np.linalg.eigvalsh(G)[-1]), None


def top_eigenvalues(
    G: np.ndarray, starts: list[np.ndarray | None] | None = None, *, rtol: float = 1e-12
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """λ_1 and its eigenvector for each matrix of a (K, m, m) stack of symmetric positive
    semi-definite float64 matrices.

    Lanczos with full reorthogonalisation, from ``starts`` (the previous measurement's top vectors)
    or a fixed-seed random vector, stopped when the error estimate of the top Ritz value,
    min(‖r‖, ‖r‖² / gap) with r the Ritz residual and gap the distance to the next Ritz value, is
    below ``rtol`` · λ_1. The result is then certified: a Ritz value θ never exceeds λ_1, and a
    Cholesky factor of θ·(1 + 1e-10)·I − G shows that no eigenvalue exceeds θ·(1 + 1e-10), so θ is
    within 1e-10 of λ_1. (A warm start can converge to a lower eigenvalue when the previous top
    direction has been overtaken; the certificate catches that, and a random start follows.)
    Matrices smaller than 160 (where a full eigendecomposition is cheaper), and any whose value is
    not certified, get a full eigendecomposition instead (vector None).
    """
    G = np.asarray(G, dtype=np.float64)
    K, m = G.shape[0], G.shape[-1]
    vecs: list[np.ndarray | None] = [None] * K
    if m < _LANCZOS_MIN_SIZE or K == 0:
        return (np.linalg.eigvalsh(G)[:, -1] if m else np.zeros(K)), vecs
    top = np.empty(K)
    for j in range(K):
        top[j], vecs[j] = _certified_top(G[j], None if starts is None else starts[j], rtol)
    return top, vecs


def top_eigenvalue(G: np.ndarray, start: np.ndarray | None = None, *, rtol: float = 1e-12) -> tuple[float, np.ndarray | None]:
    """λ_1 and its eigenvector of one symmetric PSD float64 matrix (see :func:`top_eigenvalues`)."""
    G = np.asarray(G, dtype=np.float64)
    top, vecs = top_eigenvalues(G[None], [start], rtol=rtol)
    return float(top[0]), vecs[0]


_POOL: Any = None


def _pool(workers: int) -> Any:
    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dimscope-eig")
    return _POOL


# Threads pay off only for a large stack: right after a torch op, torch's OpenMP workers keep
# spinning on the other cores for a while, and a short job on a second thread only competes with them.
_THREADS_MIN_WORK = 8 * 128**3


def _eigvalsh_stack(G: np.ndarray, threads: int) -> np.ndarray:
    """Ascending eigenvalues of a (K, m, m) stack, split over up to ``threads`` threads when the
    stack is large (LAPACK releases the GIL, and with one BLAS thread each the calls run side by side)."""
    K, m = G.shape[0], G.shape[-1]
    parts = min(threads, K) if K * m**3 >= _THREADS_MIN_WORK else 1
    if parts <= 1:
        return np.linalg.eigvalsh(G)
    bounds = np.linspace(0, K, parts + 1).astype(int)
    chunks = [G[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    futures = [_pool(parts - 1).submit(np.linalg.eigvalsh, c) for c in chunks[1:]]
    first = np.linalg.eigvalsh(chunks[0])
    return np.concatenate([first] + [f.result() for f in futures])


# The float64 copies of a chunk of same-shape matrices stay under this size (in cache).
_CHUNK_BYTES = 2**20


class Workspace:
    """Float64 buffers that :func:`batch_spectra` reuses from one call to the next.

    A measurement series computes Gram matrices of the same shapes at every flush; buffers that
    stay allocated spare the allocator's fresh pages (measured: the Gram step of the 784-256-128-10
    benchmark ran about 1.5x slower into new memory than into reused memory). Buffers are kept up to
    ``max_bytes`` in total; larger ones are allocated per call, where the eigendecomposition dwarfs
    the page faults anyway. One caller at a time (the Tracker serialises its flushes); CPU only.
    """

    def __init__(self, max_bytes: int = 32 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._bufs: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def nbytes(self) -> int:
        return sum(b.numel() * 8 for b in self._bufs.values())

    def get(self, tag: str, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A float64 CPU tensor of shape ``(rows, *shape)`` (contents undefined)."""
        key = (tag, shape)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            with torch.inference_mode(False):  # a normal tensor, usable after an inference_mode block
                buf = torch.empty((rows, *shape), dtype=torch.float64)
            self._bufs.pop(key, None)
            if self.nbytes() + buf.numel() * 8 <= self.max_bytes:
                self._bufs[key] = buf
        return buf[:rows]


def _grams64(
    ts: list[torch.Tensor], center: bool | None, workspace: Workspace | None = None, slot: int = 0
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The float64 Gram matrices of same-shape matrices, stacked: of features (``center``
    True/False: the covariance / second moment, normalised) or of weights (``None``: W reshaped to
    (out, -1), not normalised), from the smaller side, computed by torch (the training's own threads),
    on CPU. Also returns which of them are finite: NaN or Inf anywhere in X lands, squared, on the
    diagonal of its Gram matrix. With a ``workspace`` (CPU tensors), the float64 copies and the
    Gram stack are written into its buffers (the Gram stack into buffer ``slot``: one per stack
    that must live at the same time); the result is valid until that buffer's next use."""
    n, d = ts[0].shape[0], int(np.prod(ts[0].shape[1:]))
    m = min(n, d)
    per = max(1, _CHUNK_BYTES // (8 * n * d))  # matrices per chunk: the float64 copies stay in cache
    ws = workspace if ts[0].device.type == "cpu" else None
    K = len(ts)
    tiny: list[torch.Tensor] = []  # per chunk: which Gram matrices underflowed (values too small to square)
    G = ws.get(f"gram{slot}", K, (m, m)) if ws is not None else torch.empty((K, m, m), dtype=torch.float64, device=ts[0].device)
    for a in range(0, K, per):
        chunk = [t.detach().reshape(n, d) for t in ts[a : a + per]]
        if ws is not None:
            X = ws.get("x", per, (n, d))[: len(chunk)]
            for x, c in zip(X, chunk):
                x.copy_(c)
        else:
            X = chunk[0][None] if len(chunk) == 1 else torch.stack(chunk)
            X = X.to(torch.float64, copy=len(chunk) == 1 and bool(center))  # a private copy where it is changed
        if center:
            _center_(X, 1)
        Gc = G[a : a + len(chunk)]
        torch.matmul(X, X.mT, out=Gc) if n <= d else torch.matmul(X.mT, X, out=Gc)
        small = Gc.diagonal(dim1=1, dim2=2).amax(-1) < _TINY_GRAM
        # which are not all zeros: on a device without a wait (the flags come back with the Grams), on
        # the CPU only when some Gram is that small (the extra pass over X is then rare)
        tiny.append(small & X.flatten(1).ne(0).any(1) if X.device.type != "cpu" or bool(small.any()) else small)
    Gn = G.cpu().numpy()
    finite = np.isfinite(np.diagonal(Gn, axis1=1, axis2=2)).all(axis=1) & ~torch.cat(tiny).cpu().numpy()
    if center is not None:
        Gn /= float(max(n - (1 if center else 0), 1))
    return Gn, finite, n, d


def _by_ceiling(items: list[tuple[int, np.ndarray, int, int]], tasks: list[Any]) -> dict[int, list[int]]:
    """Positions in ``items`` grouped by the number of eigenvalues kept, min(n - 1, d) or min(n, d)."""
    out: dict[int, list[int]] = {}
    for r, (i, _, n, d) in enumerate(items):
        out.setdefault(ceiling(n, d, bool(tasks[i][1])), []).append(r)
    return out


def _stacked(where: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The (K, m, m) stack of Gram matrices given as (their stack, row): a view when they are
    consecutive rows of one stack, else a copy."""
    G0, j0 = where[0]
    if all(G is G0 and j == j0 + r for r, (G, j) in enumerate(where)):
        return G0[j0 : j0 + len(where)]
    return np.stack([G[j] for G, j in where])


def batch_spectra(
    tasks: list[tuple[torch.Tensor, bool | None, bool]],
    *,
    threads: int = 1,
    starts: dict[Any, np.ndarray] | None = None,
    slots: list[Any] | None = None,
    workspace: Workspace | None = None,
) -> list[Spectrum | Moments | BaseException]:
    """Spectra (or moments) of many matrices at once: the kernel of the Tracker's measurements.

    Each task is ``(tensor, center, full)``: ``center`` True/False for features (as
    :func:`spectrum`), ``None`` for a weight (as :func:`weight_spectrum`); ``full`` asks for the
    whole :class:`Spectrum`, else only :class:`Moments`. Same-shape matrices are stacked: one
    float64 cast, centering and batched Gram product per shape, by torch; the eigendecompositions
    of one size are stacked and split over ``threads`` threads with one BLAS thread each. The same
    numbers as :func:`spectrum` to round-off. A task with NaN or Inf values gets a
    :class:`NonFiniteError` in its place.

    ``slots`` names what each task measures (e.g. a layer and convention) and ``starts`` maps a slot
    to the last top eigenvector found for it: each moment task starts Lanczos from its slot's vector
    and leaves its own there (updated in place), so a series of measurements warm-starts itself.
    A :class:`Workspace` lends its buffers to the Gram matrices (a series of calls of the same
    shapes then allocates no new float64 memory).
    """
    out: list[Spectrum | Moments | BaseException] = [NonFiniteError("no result")] * len(tasks)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (t, center, _) in enumerate(tasks):
        if t.ndim < 2:
            raise ValueError(f"batch_spectra needs matrices (samples x features). Got shape {tuple(t.shape)}.")
        groups.setdefault((tuple(t.shape), t.dtype, t.device, center), []).append(i)
    # (index, its Gram matrix, n, d): by Gram size for whole spectra, in task order for moments
    full: dict[int, list[tuple[int, np.ndarray, int, int]]] = {}
    where: dict[int, list[tuple[np.ndarray, int]]] = {}  # (its Gram stack, row) of each item of full
    moments: list[tuple[int, np.ndarray, int, int]] = []
    for g, ((shape, _, _, center), idx) in enumerate(groups.items()):
        try:
            if shape[0] < 1 or int(np.prod(shape[1:])) < 1:
                raise ValueError(f"A spectrum needs at least 1 sample and 1 feature. Got a matrix of shape {shape}.")
            if center and shape[0] < 2:  # its covariance has no eigenvalue: not a rank of 0
                raise ValueError(f"A centered spectrum needs at least 2 samples. Got a matrix of shape {shape}.")
            Gn, finite, n, d = _grams64([tasks[i][0] for i in idx], center, workspace, slot=g)
        except Exception as e:  # noqa: BLE001 - in each task's place
            for i in idx:
                out[i] = e
            continue
        for j, i in enumerate(idx):
            if not finite[j]:
                what = "weight" if center is None else "feature"
                out[i] = NonFiniteError(f"The {what} matrix holds NaN or Inf values, or values too large or too small to square in "
                                        f"float64 (|x| > 1e154, or a largest |x| under about 1e-154 but not 0).")
                continue
            if tasks[i][2]:
                full.setdefault(Gn.shape[1], []).append((i, Gn[j], n, d))
                where.setdefault(Gn.shape[1], []).append((Gn, j))
            else:
                moments.append((i, Gn[j], n, d))
    for size, items in full.items():
        try:
            raw = _eigvalsh_stack(_stacked(where[size]), threads)[:, ::-1]  # reads one triangle
        except Exception:  # noqa: BLE001 - one by one, so that a failure stays with its own task
            kept, rows_ok = [], []
            for it in items:
                try:
                    rows_ok.append(np.linalg.eigvalsh(it[1])[::-1])
                    kept.append(it)
                except Exception as e:  # noqa: BLE001
                    out[it[0]] = e
            items = kept
            raw = np.array(rows_ok).reshape(len(kept), size)
        for m, rows in _by_ceiling(items, tasks).items():
            E, bad = _clean_stack(raw[rows, :m], size)
            traces = E.sum(axis=1)
            for r, ev, tr, not_psd in zip(rows, E, traces, bad):
                i, _, n, d = items[r]
                out[i] = _not_psd(raw[r, :m]) if not_psd else Spectrum(ev, n, d, bool(tasks[i][1]), float(tr))
    starts = {} if starts is None else starts
    for i, g, n, d in moments:  # in order: each from the latest top vector of its slot
        slot = slots[i] if slots is not None else None
        try:
            top, vec = top_eigenvalue(g, starts.get(slot))
        except Exception as e:  # noqa: BLE001 - in this task's place
            out[i] = e
            continue
        if slot is not None and vec is not None:
            starts[slot] = vec
        sum_sq = float(np.einsum("ij,ij->", g, g))
        rel = sum_sq / top / top if top > 0 else 0.0
        if top > 0 and not (np.isfinite(sum_sq) and 1e-280 < sum_sq < 1e280):  # scaled first: no over- or underflow
            gs = g / top
            rel = float(np.einsum("ij,ij->", gs, gs))
        out[i] = Moments(float(np.trace(g)), sum_sq, top, n, d, bool(tasks[i][1]), rel)
    return out


def spectrum_from_gram(
    G: Any, n_samples: int, n_features: int, *, centered: bool = True, normalized: bool = False, check_finite: bool = True
) -> Spectrum:
    """Spectrum from an accumulated Gram matrix (XᵀX, d x d, or XXᵀ, n x n) in float64.

    ``G`` is the raw sum of outer products (already centered if ``centered``); it is divided by
    n - 1 (centered) or n (uncentered) unless ``normalized``. This is the entry point for Gram
    matrices accumulated across batches or all-reduced across ranks.
    """
    G = torch.as_tensor(G).to(torch.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] not in (n_samples, n_features):
        raise ValueError(
            f"The 'G' parameter of spectrum_from_gram must be a square Gram matrix of size n_samples ({n_samples}) "
            f"or n_features ({n_features}). Got shape {tuple(G.shape)}."
        )
    if check_finite and not torch.isfinite(G).all():
        raise NonFiniteError("The Gram matrix holds NaN or Inf values.")
    asym = float((G - G.T).abs().max()) if G.numel() else 0.0
    if asym > 1e-6 * float(G.abs().max()):
        raise ValueError(
            f"The 'G' parameter of spectrum_from_gram must be symmetric (to 1e-6 of its largest entry). "
            f"Got a largest asymmetry |G - Gᵀ| of {asym:.3e}, largest entry {float(G.abs().max()):.3e}."
        )
    return _spectrum_from_gram(G, n_samples, n_features, centered, normalized)


def _spectrum_from_gram(G: torch.Tensor, n: int, d: int, centered: bool, normalized: bool) -> Spectrum:
    denom = 1.0 if normalized else float(max(n - (1 if centered else 0), 1))
    ev = _eigvalsh_desc(G / denom)
    return Spectrum(ev[: ceiling(n, d, centered)].copy(), n, d, centered)


def spectrum(X: Any, center: bool = True) -> Spectrum:
    """The covariance eigen-spectrum of a feature matrix ``X`` (n samples x d features).

    Computed in float64 from the smaller of XᵀX and XXᵀ; see the module docstring for the
    convention. Raises :class:`NonFiniteError` if ``X`` holds NaN or Inf.
    """
    X = _as_matrix(X)
    center = check_bool(center, "center", owner="spectrum")
    n, d = X.shape
    if n < (2 if center else 1):
        raise ValueError(f"The 'X' parameter of spectrum needs at least {2 if center else 1} samples (rows){' to center' if center else ''}. Got {n}.")
    if d < 1:
        raise ValueError("The 'X' parameter of spectrum needs at least 1 feature (column). Got 0.")
    X = X.detach().to(torch.float64, copy=bool(center))  # one private copy, centered in place
    if not torch.isfinite(X).all():
        raise NonFiniteError("The feature matrix holds NaN or Inf values.")
    if center:
        _center_(X, 0)
    G = X @ X.T if n <= d else X.T @ X
    if not torch.isfinite(G).all():
        raise NonFiniteError("The feature matrix holds values too large to square in float64 (|x| > 1e154).")
    if _gram_underflowed(G) and bool(X.ne(0).any()):
        raise _underflow_error("feature", bool(center))
    return _spectrum_from_gram(G, n, d, bool(center), False)


# A Gram matrix whose largest diagonal entry (a squared norm) is under this, float64's smallest normal
# number, while its matrix is not all zeros, has its values in the subnormal range, losing digits
# (about 1e-5 relative at 1e-319), or at 0: every metric would read 0. Entries under about 1e-154.
_TINY_GRAM = float(np.finfo(np.float64).tiny)


def _gram_underflowed(G: torch.Tensor) -> bool:
    """Whether the Gram matrix ``G``'s largest squared norm is under float64's normal range (its
    matrix then underflowed, unless it is all zeros: the caller checks that)."""
    return G.numel() > 0 and float(G.diagonal().max()) < _TINY_GRAM


def _underflow_error(what: str, centered: bool = False) -> NonFiniteError:
    return NonFiniteError(f"The {what} matrix holds values{' (after centering)' if centered else ''} too small to square in float64 "
                          "(a largest |x| under about 1e-154, but not 0): its spectrum would underflow to a false 0. Rescale it.")


def weight_spectrum(W: Any) -> Spectrum:
    """Spectrum of a weight matrix: squared singular values of W reshaped to (out, -1), uncentered.

    The values are σ_i(W)² (no division by n), so ``stable_rank`` is ‖W‖_F² / ‖W‖_2².
    """
    if isinstance(W, (list, tuple)):
        W = torch.as_tensor(W)
    W = _as_real_tensor(W, "W", "weight_spectrum", "a torch.Tensor, numpy array or nested list").detach()
    if W.ndim < 2:
        raise ValueError(f"A weight spectrum needs a weight of at least 2 dimensions. Got shape {tuple(W.shape)}.")
    W = W.reshape(W.shape[0], -1).to(torch.float64)
    if not torch.isfinite(W).all():
        raise NonFiniteError("The weight matrix holds NaN or Inf values.")
    n, d = W.shape
    G = W @ W.T if n <= d else W.T @ W
    if not torch.isfinite(G).all():
        raise NonFiniteError("The weight matrix holds values too large to square in float64 (|w| > 1e154).")
    if _gram_underflowed(G) and bool(W.ne(0).any()):
        raise _underflow_error("weight")
    ev = _eigvalsh_desc(G)
    return Spectrum(ev[: min(n, d)].copy(), n, d, centered=False)
