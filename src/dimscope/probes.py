"""Linear probes: how much of a target can a linear read-out find in a layer's representation?

* :func:`probe_split` — a train/test split of the probe set fixed by a seed. Call it once and
  reuse the result at every checkpoint: the same rows train and test every probe of a series.
* :class:`LinearProbe` — a scikit-learn-style estimator. ``kind="ridge"`` (default) is a closed-form
  ridge regression in torch (float64) on standardized features, one-hot targets for classification,
  prediction = argmax; ``kind="logistic"`` is scikit-learn's ``LogisticRegression``
  (multinomial, L2, ``C = 1 / alpha``) on the same standardized features. Standardization
  (mean / std from the training rows) is part of the probe.
* :func:`probe_layers` — fit one probe per layer and return the test accuracy of each.

Closed-form ridge: with standardized training features Z (n × d, plus a column of ones for the
intercept, which is not penalised) and one-hot targets Y, W = (ZᵀZ + α·n·I)⁻¹ ZᵀY, where α is the
penalty per sample (so its meaning does not change with n).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validation import check_choice, check_float, check_int

__all__ = ["ProbeSplit", "probe_split", "LinearProbe", "probe_layers"]


@dataclass(frozen=True)
class ProbeSplit:
    """Row indices of the probe set used to train and to test the probes (sorted, disjoint), out of
    ``n`` rows (rows in neither are unused, e.g. after restricting the test rows to a subset)."""

    train: np.ndarray
    test: np.ndarray
    seed: int
    n: int

    def __post_init__(self) -> None:
        if len(np.intersect1d(self.train, self.test)):
            raise ValueError("A ProbeSplit's train and test rows must be disjoint.")
        top = max(int(np.max(self.train, initial=-1)), int(np.max(self.test, initial=-1)))
        if top >= self.n:
            raise ValueError(f"A ProbeSplit over n={self.n} rows holds row index {top}.")

    def restrict_test(self, keep: Any) -> ProbeSplit:
        """The same split with only the test rows where the boolean mask ``keep`` (length n) is True."""
        keep = np.asarray(keep, dtype=bool)
        return ProbeSplit(self.train, self.test[keep[self.test]], self.seed, self.n)

    def key(self) -> str:
        """A short hash of the split (stored beside probe results to show it never changed)."""
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.train, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.ascontiguousarray(self.test, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def probe_split(n: int, test_fraction: float = 0.3, seed: int = 0, stratify: Any = None) -> ProbeSplit:
    """A seeded train/test split of ``n`` probe rows (scikit-learn's ``train_test_split``).

    The result depends only on ``n``, ``test_fraction``, ``seed`` (and ``stratify``), never on the
    features, so a split made once is identical for every checkpoint.
    """
    n = check_int(n, "n", min_value=4, owner="probe_split")
    test_fraction = check_float(test_fraction, "test_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, owner="probe_split")
    seed = check_int(seed, "seed", min_value=0, owner="probe_split")
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(n), test_size=test_fraction, random_state=seed, stratify=stratify)
    return ProbeSplit(np.sort(tr), np.sort(te), seed, n)


def _as_np(X: Any) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu()
        X = (X.to(torch.float64) if X.is_floating_point() else X).numpy()  # numpy has no bfloat16
    return np.asarray(X)


class LinearProbe:
    """A linear classifier on one layer's features.

    Parameters
    ----------
    kind:
        ``"ridge"`` (closed form, torch float64) or ``"logistic"`` (scikit-learn).
    alpha:
        L2 penalty per sample for ridge; ``C = 1 / alpha`` for logistic regression.
    max_iter:
        Iterations for logistic regression.

    Attributes (after ``fit``): ``classes_``, ``mean_``, ``scale_``, ``coef_`` (d × classes),
    ``intercept_``.
    """

    def __init__(self, kind: str = "ridge", alpha: float = 1e-3, max_iter: int = 200) -> None:
        self.kind = kind
        self.alpha = alpha
        self.max_iter = max_iter

    def fit(self, X: Any, y: Any) -> LinearProbe:
        check_choice(self.kind, "kind", ("ridge", "logistic"), owner="LinearProbe")
        alpha = check_float(self.alpha, "alpha", low=0.0, low_inclusive=False, owner="LinearProbe")
        check_int(self.max_iter, "max_iter", min_value=1, owner="LinearProbe")
        X = _as_np(X).astype(np.float64)
        y = _as_np(y).reshape(-1)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"LinearProbe.fit needs X of shape (n, d) and y of length n. Got {X.shape} and {y.shape}.")
        if not np.isfinite(X).all():
            raise ValueError("LinearProbe.fit: the features hold NaN or Inf values.")
        self.classes_ = np.unique(y)
        self.mean_ = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale_ = np.where(sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-300), sd, 1.0)
        Z = (X - self.mean_) / self.scale_
        if self.kind == "ridge":
            Zt = torch.from_numpy(Z)
            onehot = torch.from_numpy((y[:, None] == self.classes_[None, :]).astype(np.float64))
            target = onehot - onehot.mean(0, keepdim=True)  # the intercept is the class mean (unpenalised)
            A = Zt.T @ Zt + alpha * len(Z) * torch.eye(Z.shape[1], dtype=torch.float64)
            W = torch.linalg.solve(A, Zt.T @ target)
            self.coef_ = W.numpy()
            self.intercept_ = onehot.mean(0).numpy()
        else:
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(C=1.0 / alpha, max_iter=self.max_iter)
            clf.fit(Z, y)
            coef = clf.coef_.T
            icpt = clf.intercept_
            if len(self.classes_) == 2:  # sklearn's binary form: one column for the positive class
                coef = np.concatenate([-coef / 2, coef / 2], axis=1)
                icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
            self.coef_ = coef
            self.intercept_ = icpt
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise RuntimeError("This LinearProbe is not fitted yet; call fit(X, y) first.")
        Z = (_as_np(X).astype(np.float64) - self.mean_) / self.scale_
        return Z @ self.coef_ + self.intercept_

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy on (X, y)."""
        return float(np.mean(self.predict(X) == _as_np(y).reshape(-1)))


def probe_layers(
    features: Mapping[str, Any], y: Any, split: ProbeSplit, *, kind: str = "ridge", alpha: float = 1e-3, max_iter: int = 200
) -> dict[str, dict[str, float]]:
    """One probe per layer on the fixed ``split``: ``{layer: {"train_acc": ..., "test_acc": ...}}``."""
    y = _as_np(y).reshape(-1)
    if split.n != len(y):
        raise ValueError(f"The 'split' covers {split.n} rows but the probe targets have {len(y)}; make the split from the same probe set.")
    out: dict[str, dict[str, float]] = {}
    for layer, X in features.items():
        X = _as_np(X)
        if len(X) != len(y):
            raise ValueError(f"Layer {layer!r} has {len(X)} feature rows but the probe targets have {len(y)}.")
        probe = LinearProbe(kind=kind, alpha=alpha, max_iter=max_iter).fit(X[split.train], y[split.train])
        out[layer] = {"train_acc": probe.score(X[split.train], y[split.train]), "test_acc": probe.score(X[split.test], y[split.test])}
    return out
