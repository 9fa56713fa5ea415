"""First-layer pre-training that raises the function-space ε-rank (arXiv 2412.05144 / 2507.11962).

:func:`pretrain_first_layer` modifies the model in place and returns a :class:`PretrainResult`.

Methods
-------
``"structured"`` (the idea of arXiv 2507.11962, our parametrisation): neuron j of the first
``nn.Linear`` (weights w_j, bias b_j; activation σ after it) becomes σ(s·u_jᵀ(x − c_j)):

* orientations u_j: in 1-D alternately +1 / −1; in d-D unit vectors spread evenly (angles
  2πj/n in 2-D, a scrambled Sobol sequence mapped to the sphere otherwise);
* breakpoints c_j (where the pre-activation is 0): spread over the box Ω — the midpoints of n equal
  cells in 1-D, a scrambled Sobol sequence in d-D (``scipy.stats.qmc``);
* scale s = ``sharpness`` · n^(1/d) / L̄ with L̄ the mean side of Ω, so each neuron's transition is
  about as wide as the spacing of the breakpoints.

So w_j = s·u_j, b_j = −s·u_jᵀc_j. Later layers are left as they are.

``"decorrelate"`` (ours): a short Adam pre-training of the first layer only, minimising
‖C − I‖²_F / n² where C is the normalised Gram matrix (cosines in L²_W) of the first hidden layer's
neuron functions on the quadrature — pushing the neurons towards orthogonality raises its ε-rank.

``"both"``: ``"structured"`` then ``"decorrelate"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int
from ..capture import resolve_layers
from .epsrank import EpsRank, Quadrature, _check_box, eps_rank_function_space, trapezoid

__all__ = ["PretrainResult", "pretrain_first_layer", "first_layers", "structured_first_layer"]


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain_first_layer` did: the layer names, the method, and the first hidden
    layer's function-space ε-rank before and after (same quadrature, ε, normalisation)."""

    linear: str
    hidden: str
    method: str
    before: EpsRank
    after: EpsRank
    losses: tuple[float, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "linear": self.linear,
            "hidden": self.hidden,
            "method": self.method,
            "eps_rank_before": self.before.count,
            "eps_rank_after": self.after.count,
            **{f"eps_rank_{k}": v for k, v in self.after.info().items() if k in ("eps", "weights", "normalize", "n_points")},
        }


def first_layers(model: nn.Module, linear: str | None = None, hidden: str | None = None) -> tuple[str, str]:
    """(first ``nn.Linear`` path, the module whose output are its neuron functions).

    The hidden module defaults to the parameter-free module right after the Linear in
    ``named_modules()`` order (its activation, e.g. ``nn.Tanh``), else the Linear itself.
    """
    mods = [(n, m) for n, m in model.named_modules() if n]
    if linear is None:
        lin = [n for n, m in mods if isinstance(m, nn.Linear)]
        if not lin:
            raise ValueError("pretrain_first_layer needs a model with an nn.Linear first layer; this model has none.")
        linear = lin[0]
    else:
        linear = resolve_layers(model, linear)[0]
    if not isinstance(model.get_submodule(linear), nn.Linear):
        raise ValueError(f"The 'linear' parameter of pretrain_first_layer must name an nn.Linear. Got {linear!r} ({type(model.get_submodule(linear)).__name__}).")
    if hidden is None:
        names = [n for n, _ in mods]
        i = names.index(linear)
        nxt = mods[i + 1][1] if i + 1 < len(mods) else None
        hidden = mods[i + 1][0] if nxt is not None and not any(True for _ in nxt.parameters()) and not list(nxt.children()) else linear
    else:
        hidden = resolve_layers(model, hidden)[0]
    return linear, hidden


def _sphere_directions(n: int, d: int, seed: int) -> np.ndarray:
    if d == 1:
        return np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    if d == 2:
        ang = 2 * np.pi * (np.arange(n) + 0.5) / n
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    from scipy.stats import norm, qmc

    z = norm.ppf(np.clip(qmc.Sobol(d, scramble=True, seed=seed).random(n), 1e-9, 1 - 1e-9))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _breakpoints(n: int, box: tuple[tuple[float, float], ...], seed: int) -> np.ndarray:
    lo = np.array([a for a, _ in box])
    hi = np.array([b for _, b in box])
    if len(box) == 1:
        return (lo + (hi - lo) * (np.arange(n) + 0.5) / n)[:, None]
    from scipy.stats import qmc

    u = qmc.Sobol(len(box), scramble=True, seed=seed).random(n)
    return lo + (hi - lo) * u


@torch.no_grad()
def structured_first_layer(layer: nn.Linear, domain: Any, *, sharpness: float = 1.0, seed: int = 0) -> None:
    """Set ``layer``'s weights and biases to the structured initialization (module docstring)."""
    box = _check_box(domain, "structured_first_layer")
    d = len(box)
    if layer.in_features != d:
        raise ValueError(f"The 'domain' parameter has {d} axes but the first layer takes {layer.in_features} inputs.")
    n = layer.out_features
    u = _sphere_directions(n, d, seed)
    rng = np.random.default_rng(seed)
    c = _breakpoints(n, box, seed)[rng.permutation(n)] if d == 1 else _breakpoints(n, box, seed)
    mean_side = float(np.mean([b - a for a, b in box]))
    s = sharpness * n ** (1.0 / d) / mean_side
    W = s * u
    b = -s * np.sum(u * c, axis=1)
    layer.weight.copy_(torch.as_tensor(W, dtype=layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.as_tensor(b, dtype=layer.bias.dtype))


def _normalized_gram(phi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    norms = torch.sqrt((w[:, None] * phi * phi).sum(0)).clamp_min(1e-12)
    P = phi / norms
    return P.T @ (w[:, None] * P)


def check_pretrain_options(method: Any, sharpness: Any, steps: Any, lr: Any, *, owner: str) -> tuple[str, float, int, float]:
    """The options of :func:`pretrain_first_layer` checked (callers that pass them on check them up
    front, before anything is trained or overwritten)."""
    check_choice(method, "method", ("structured", "decorrelate", "both"), owner=owner)
    return (method, check_float(sharpness, "sharpness", low=0.0, low_inclusive=False, owner=owner),
            check_int(steps, "steps", min_value=0, owner=owner), check_float(lr, "lr", low=0.0, low_inclusive=False, owner=owner))


def pretrain_first_layer(
    model: nn.Module,
    domain: Any,
    *,
    method: str = "structured",
    linear: str | None = None,
    hidden: str | None = None,
    points: Quadrature | None = None,
    sharpness: float = 1.0,
    steps: int = 200,
    lr: float = 1e-2,
    eps: float = 1e-3,
    normalize: bool = False,
    seed: int = 0,
) -> PretrainResult:
    """Raise the ε-rank of the first hidden layer before training; modifies ``model`` in place.

    Parameters
    ----------
    model:
        The network; its first ``nn.Linear`` (or ``linear``) is changed, nothing else.
    domain:
        The input domain Ω: (a, b) or a box [(a1, b1), …].
    method:
        "structured", "decorrelate" or "both" (module docstring).
    points:
        The quadrature for the decorrelation objective and the reported ε-ranks (default: trapezoid,
        257 points per axis in 1-D, 33 per axis otherwise).
    sharpness:
        Scale of the structured neurons relative to the breakpoint spacing.
    steps, lr:
        Adam steps and learning rate of the decorrelation pre-training.
    eps, normalize:
        How the reported ε-ranks are counted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter of pretrain_first_layer must be a torch.nn.Module. Got {type(model).__name__} instead.")
    box = _check_box(domain, "pretrain_first_layer")
    method, sharpness, steps, lr = check_pretrain_options(method, sharpness, steps, lr, owner="pretrain_first_layer")
    lin_name, hid_name = first_layers(model, linear, hidden)
    lin: nn.Linear = model.get_submodule(lin_name)  # type: ignore[assignment]
    if lin.in_features != len(box):
        raise ValueError(f"The 'domain' parameter has {len(box)} axes but the first layer takes {lin.in_features} inputs.")
    q = points if points is not None else trapezoid(box, 257 if len(box) == 1 else 33)
    before = eps_rank_function_space(model, hid_name, q, eps=eps, normalize=normalize)
    losses: list[float] = []
    if method in ("structured", "both"):
        structured_first_layer(lin, box, sharpness=sharpness, seed=seed)
    if method in ("decorrelate", "both") and steps > 0:
        params = [p for p in lin.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        dev = lin.weight.device
        w = torch.as_tensor(q.weights, dtype=torch.float32, device=dev)
        x = q.points.to(device=dev, dtype=lin.weight.dtype)
        n = lin.out_features
        eye = torch.eye(n, device=dev)
        act = model.get_submodule(hid_name) if hid_name != lin_name else nn.Identity()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            # the first layer sees the raw inputs, so its neuron functions are act(lin(x))
            phi = act(lin(x)).reshape(x.shape[0], -1).float()
            loss = ((_normalized_gram(phi, w) - eye) ** 2).sum() / n**2
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        for p in params:
            p.grad = None
    after = eps_rank_function_space(model, hid_name, q, eps=eps, normalize=normalize)
    return PretrainResult(lin_name, hid_name, method, before, after, tuple(losses))
