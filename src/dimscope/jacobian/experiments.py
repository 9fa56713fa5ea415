"""The experiments that give the chaotic / bulk / stable subspaces their meaning (REFERENCE.md section 1).

All of them take a :class:`TrainingJacobian` of a model trained with a :class:`TrainConfig` and
re-run (parts of) that training functionally; the model object is never modified. Singular vectors:
``v_i`` = ``Vh[i]`` lives in initial-parameter space, ``u_i`` = ``U[:, i]`` in final-parameter space.

* :func:`perturbation_linearity` -- train from ``theta_0 + eps v_i``; the linear prediction of the
  change of the final parameters is ``eps J v_i = eps sigma_i u_i``; reports the relative deviation
  ``||dtheta_final - eps sigma_i u_i|| / ||eps sigma_i u_i||``, the gain ``||dtheta_final|| / eps``,
  ``cos(dtheta_final, v_i)`` and the test loss.
* :func:`added_vector_kl` -- ``KL(p(x; theta_final) || p(x; theta_final + u_i))`` for every input x of
  a set, the maximum over the set, per singular index i.
* :func:`restricted_training` -- training with every gradient projected onto the span of k singular
  vectors ``v_i`` of one region (chaotic: the k largest sigma; bulk: the k with sigma closest to 1;
  stable: the k smallest) or onto its orthogonal complement.
* :func:`bulk_overlap` -- principal angles between two bulk subspaces (``scipy.linalg.subspace_angles``),
  summarized as the mean squared cosine (1 = same subspace; k/n expected for random subspaces).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import vmap

from .._validation import check_choice
from .core import TrainingJacobian
from .training import ParamSpec, TrainConfig, functional_train

__all__ = [
    "evaluate",
    "perturbation_linearity",
    "added_vector_kl",
    "region_indices",
    "restricted_training",
    "bulk_overlap",
]


def evaluate(model: nn.Module, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy") -> tuple[np.ndarray, np.ndarray]:
    """(loss, accuracy) of parameters ``theta`` ((n,) or (P, n)) on (X, y); arrays of length P.
    Computed on the model's device (theta, X and y are moved there)."""
    spec = ParamSpec(model)
    X, y = X.to(spec.device), y.to(spec.device)
    th = theta.reshape(-1, spec.n).to(device=spec.device, dtype=X.dtype)
    with torch.no_grad():
        out = vmap(spec.forward, in_dims=(0, None))(th, X)  # (P, N, C)
        if loss == "mse":
            t = torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
            lv = ((out - t) ** 2).mean(dim=(1, 2))
        else:
            lv = torch.stack([torch.nn.functional.cross_entropy(o, y) for o in out])
        acc = (out.argmax(-1) == y).double().mean(1)
    return lv.double().cpu().numpy(), acc.cpu().numpy()


def perturbation_linearity(
    model: nn.Module, tj: TrainingJacobian, X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
    *, indices: Sequence[int], eps: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100, 1000), cfg: TrainConfig | None = None,
) -> pd.DataFrame:
    """One row per (index, eps); all perturbed runs train side by side (see the module doc)."""
    cfg = cfg or tj.config
    if cfg is None:
        raise ValueError("The 'cfg' parameter of perturbation_linearity is required when the Jacobian has no config.")
    U, s, Vh = tj.U.double(), tj.singular_values.double(), tj.Vh.double()
    th0, thf = tj.theta0.double(), tj.theta_final.double()
    pairs = [(int(i), float(e)) for i in indices for e in eps]
    Theta0 = torch.stack([th0 + e * Vh[i] for i, e in pairs]).to(tj.J.dtype)
    final = functional_train(model, X, y, cfg, theta0=Theta0, dtype=tj.J.dtype, record=False).theta_final.double().cpu()
    test_loss, test_acc = evaluate(model, final, X_test, y_test, loss=cfg.loss if isinstance(cfg.loss, str) else "cross_entropy")
    rows = []
    for r, (i, e) in enumerate(pairs):
        d = final[r] - thf
        lin = e * s[i] * U[:, i]
        rows.append({
            "index": i, "sigma": float(s[i]), "eps": e, "rel_deviation": float((d - lin).norm() / lin.norm()),
            "gain": float(d.norm() / e), "cos_v": float(d @ Vh[i] / d.norm()), "test_loss": float(test_loss[r]),
            "test_accuracy": float(test_acc[r]),
        })
    return pd.DataFrame(rows)


def added_vector_kl(model: nn.Module, tj: TrainingJacobian, inputs: dict[str, torch.Tensor], indices: Sequence[int], *, batch: int = 64) -> pd.DataFrame:
    """Columns index, sigma and one per input set: ``max_x KL(p(x; theta_f) || p(x; theta_f + u_i))``."""
    spec = ParamSpec(model)
    thf = tj.theta_final.double().to(spec.device)
    U = tj.U.double().to(spec.device)
    idx = [int(i) for i in indices]
    out = {"index": idx, "sigma": tj.singular_values.double().numpy()[idx]}
    with torch.no_grad():
        for name, X in inputs.items():
            X = X.to(device=spec.device, dtype=torch.float64)
            logp0 = torch.log_softmax(spec.forward(thf, X), -1)
            res = []
            for s in range(0, len(idx), batch):
                cols = idx[s : s + batch]
                Th = thf.unsqueeze(0) + U[:, cols].T
                logp = torch.log_softmax(vmap(spec.forward, in_dims=(0, None))(Th, X), -1)
                kl = (logp0.exp() * (logp0 - logp)).sum(-1)  # (P, N)
                res.append(kl.max(1).values)
            out[name] = torch.cat(res).cpu().numpy()
    return pd.DataFrame(out)


def region_indices(sigma: np.ndarray, region: str, k: int, tau: float = 0.1) -> np.ndarray:
    """The k singular indices that represent ``region`` (see the module doc)."""
    check_choice(region, "region", ("chaotic", "bulk", "stable"), owner="region_indices")
    s = np.asarray(sigma)
    if k > len(s):
        raise ValueError(f"The 'k' parameter of region_indices must be <= n = {len(s)}. Got {k} instead.")
    if region == "chaotic":
        return np.arange(k)
    if region == "stable":
        return np.arange(len(s) - k, len(s))
    return np.sort(np.argsort(np.abs(s - 1), kind="stable")[:k])


def restricted_training(
    model: nn.Module, tj: TrainingJacobian, X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor,
    *, settings: Sequence[tuple[str, int, bool]], cfg: TrainConfig | None = None,
) -> pd.DataFrame:
    """One row per (region, k, complement): test loss and accuracy after restricted training, plus
    the unrestricted run (region "full")."""
    cfg = cfg or tj.config
    if cfg is None:
        raise ValueError("The 'cfg' parameter of restricted_training is required when the Jacobian has no config.")
    dtype = tj.J.dtype
    sigma = tj.singular_values.double().numpy()
    Vh = tj.Vh.to(device=ParamSpec(model).device, dtype=dtype)  # the projections act where the training runs
    lossname = cfg.loss if isinstance(cfg.loss, str) else "cross_entropy"
    rows = []
    full = functional_train(model, X, y, cfg, theta0=tj.theta0, dtype=dtype, record=False).theta_final
    lv, acc = evaluate(model, full, X_test, y_test, lossname)
    rows.append({"region": "full", "k": tj.n, "complement": False, "test_loss": float(lv[0]), "test_accuracy": float(acc[0])})
    for region, k, complement in settings:
        B = Vh[torch.as_tensor(region_indices(sigma, region, int(k)))]  # (k, n), orthonormal rows

        def project(g: torch.Tensor, B: torch.Tensor = B, complement: bool = complement) -> torch.Tensor:
            p = (B @ g) @ B
            return g - p if complement else p

        th = functional_train(model, X, y, cfg, theta0=tj.theta0, dtype=dtype, record=False, project=project).theta_final
        lv, acc = evaluate(model, th, X_test, y_test, lossname)
        rows.append({"region": region, "k": int(k), "complement": bool(complement), "test_loss": float(lv[0]), "test_accuracy": float(acc[0])})
    return pd.DataFrame(rows)


def bulk_overlap(a: TrainingJacobian, b: TrainingJacobian, tau: float = 0.1) -> dict[str, float]:
    """Principal angles between the bulk subspaces (spans of ``v_i``) of two Jacobians."""
    from scipy.linalg import subspace_angles

    ia, ib = a.regions(tau).bulk, b.regions(tau).bulk
    A = a.Vh.double().numpy()[ia].T
    B = b.Vh.double().numpy()[ib].T
    ang = subspace_angles(A, B)
    k = min(len(ia), len(ib))
    return {
        "k_a": len(ia), "k_b": len(ib), "mean_cos2": float(np.mean(np.cos(ang) ** 2)),
        "random_expectation": float(max(len(ia), len(ib)) / a.n), "median_angle_deg": float(np.degrees(np.median(ang))),
        "n_angles": int(k),
    }
