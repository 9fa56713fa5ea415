"""The eigen-spectrum of a feature matrix: one eigendecomposition, in float64.

Every dimensionality metric in :mod:`dimscope.metrics` is a pure function of a :class:`Spectrum`.

Convention (see the README's metric table): X is an n x d matrix, rows are samples. By default X is
**centered** (the column mean is subtracted) and the spectrum is the eigenvalues of the covariance
C = XᵀX / (n - 1). Uncentered, it is the second-moment matrix XᵀX / n. The eigenvalues are taken
from whichever of XᵀX (d x d) or XXᵀ (n x n) is smaller; both have the same non-zero eigenvalues.
The number of eigenvalues kept is the ceiling m = min(n - 1, d) centered, min(n, d) uncentered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Spectrum", "spectrum", "spectrum_from_gram", "weight_spectrum", "gram_spectra_numpy", "NonFiniteError"]

# Relative size below which a negative eigenvalue is round-off (clamped to 0); beyond it an error.
_NEG_TOL = 1e-9


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
        return max(0, min(self.n_samples - (1 if self.centered else 0), self.n_features))

    @property
    def truncated(self) -> bool:
        """True when only the top K eigenvalues are held (metrics needing the tail are approximate)."""
        return len(self.values) < self.ceiling

    @property
    def singular_values(self) -> np.ndarray:
        """σ_i = √λ_i."""
        return np.sqrt(self.values)

    def top(self, k: int | None) -> Spectrum:
        """The same spectrum truncated to its top ``k`` eigenvalues (``trace`` keeps the full sum)."""
        if k is None or k >= len(self.values):
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


def _as_matrix(X: Any) -> torch.Tensor:
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"The 'X' parameter of spectrum must be a 2-D torch.Tensor or numpy array. Got {type(X).__name__}.")
    if X.ndim != 2:
        raise ValueError(f"The 'X' parameter of spectrum must be 2-D (samples x features). Got shape {tuple(X.shape)}.")
    return X


def _clean_eigenvalues(ev: np.ndarray, size: int) -> np.ndarray:
    """Descending eigenvalues of a size x size symmetric PSD matrix: round-off negatives clamped."""
    scale = max(float(ev[0]) if len(ev) else 0.0, 0.0)
    most_negative = float(ev.min()) if len(ev) else 0.0
    if most_negative < 0 and -most_negative > _NEG_TOL * max(scale, 1e-300) * max(size, 1) and -most_negative > 1e-12:
        raise ValueError(
            f"The Gram matrix has a large negative eigenvalue ({most_negative:.3e}, largest {scale:.3e}); "
            "it is not positive semi-definite."
        )
    ev = np.clip(ev, 0.0, None)
    # Eigenvalues under the float64 round-off level of this matrix are zero, not signal.
    ev[ev < size * np.finfo(np.float64).eps * scale] = 0.0
    return ev


def _eigvalsh_desc(G: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric float64 matrix, descending, negatives from round-off clamped."""
    G = 0.5 * (G + G.T)
    return _clean_eigenvalues(torch.linalg.eigvalsh(G).flip(0).cpu().numpy(), G.shape[0])


def gram_spectra_numpy(
    arrays: list[np.ndarray], *, center: bool, normalize: bool = True
) -> list[Spectrum | NonFiniteError]:
    """:func:`spectrum` (``normalize=True``) or :func:`weight_spectrum` (``normalize=False``,
    uncentered) of many CPU arrays at once, with numpy in float64.

    Arrays of one shape are stacked: one centering, one batched Gram product and one batched
    ``eigvalsh`` per shape, so many small spectra cost little more than their arithmetic. The same
    numbers as the torch path to round-off. An array holding NaN or Inf gets a
    :class:`NonFiniteError` in its place instead of a spectrum. This is the kernel of the Tracker's
    batched measurements.
    """
    out: list[Spectrum | NonFiniteError] = [NonFiniteError("The feature matrix holds NaN or Inf values.")] * len(arrays)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"gram_spectra_numpy needs 2-D arrays (samples x features). Got shape {a.shape}.")
        groups.setdefault(a.shape, []).append(i)
    for (n, d), idx in groups.items():
        X = np.empty((len(idx), n, d), dtype=np.float64)  # a private float64 copy, cast in one pass
        for j, i in enumerate(idx):
            X[j] = arrays[i]
        finite = np.isfinite(X).all(axis=(1, 2))
        if not finite.all():
            idx = [i for i, ok in zip(idx, finite) if ok]
            X = X[finite]
            if not idx:
                continue
        if center:
            X -= X.mean(axis=1, keepdims=True)
        Xt = X.transpose(0, 2, 1)
        G = X @ Xt if n <= d else Xt @ X
        if normalize:
            G /= float(max(n - (1 if center else 0), 1))
        evs = np.linalg.eigvalsh(G)[:, ::-1]  # reads one triangle: no symmetrisation needed
        m = max(0, min(n - (1 if center else 0), d))
        for i, ev in zip(idx, evs):
            out[i] = Spectrum(_clean_eigenvalues(ev[:m].copy(), G.shape[1]), n, d, center)
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
    if check_finite and not torch.isfinite(G).all():
        raise NonFiniteError("The feature matrix holds NaN or Inf values.")
    denom = 1.0 if normalized else float(max(n_samples - (1 if centered else 0), 1))
    ev = _eigvalsh_desc(G / denom)
    m = max(0, min(n_samples - (1 if centered else 0), n_features))
    return Spectrum(ev[:m].copy(), n_samples, n_features, centered)


def spectrum(X: Any, center: bool = True) -> Spectrum:
    """The covariance eigen-spectrum of a feature matrix ``X`` (n samples x d features).

    Computed in float64 from the smaller of XᵀX and XXᵀ; see the module docstring for the
    convention. Raises :class:`NonFiniteError` if ``X`` holds NaN or Inf.
    """
    X = _as_matrix(X)
    n, d = X.shape
    if n < 2:
        raise ValueError(f"The 'X' parameter of spectrum needs at least 2 samples (rows). Got {n}.")
    if d < 1:
        raise ValueError("The 'X' parameter of spectrum needs at least 1 feature (column). Got 0.")
    X = X.detach().to(torch.float64)
    if not torch.isfinite(X).all():
        raise NonFiniteError("The feature matrix holds NaN or Inf values.")
    if center:
        X = X - X.mean(dim=0, keepdim=True)
    G = X @ X.T if n <= d else X.T @ X
    return spectrum_from_gram(G, n, d, centered=center, check_finite=False)  # X was checked


def weight_spectrum(W: Any) -> Spectrum:
    """Spectrum of a weight matrix: squared singular values of W reshaped to (out, -1), uncentered.

    The values are σ_i(W)² (no division by n), so ``stable_rank`` is ‖W‖_F² / ‖W‖_2².
    """
    W = torch.as_tensor(W).detach()
    if W.ndim < 2:
        raise ValueError(f"A weight spectrum needs a weight of at least 2 dimensions. Got shape {tuple(W.shape)}.")
    W = W.reshape(W.shape[0], -1).to(torch.float64)
    if not torch.isfinite(W).all():
        raise NonFiniteError("The weight matrix holds NaN or Inf values.")
    n, d = W.shape
    G = W @ W.T if n <= d else W.T @ W
    ev = _eigvalsh_desc(G)
    return Spectrum(ev[: min(n, d)].copy(), n, d, centered=False)
