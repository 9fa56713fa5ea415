"""Hessian-vector products of the mini-batch loss, for many tangent vectors at once.

The tangent of one training step needs ``dg = H(theta_t) dtheta``: the forward-mode derivative of
the gradient, i.e. a Hessian-vector product. Two implementations share one interface:

* :class:`GenericHVP` works for any model and loss: ``vmap`` over the tangents of
  ``jvp(grad(loss))`` (forward-over-reverse) with ``torch.func``.
* :class:`MLPHVP` is the fast path for ``Sequential(Linear, activation, Linear)`` with mean
  cross-entropy or MSE: the forward tangent of the forward *and* backward pass written out as a few
  large matrix products over a block of K tangents (no Python loop, no per-tangent graph). With
  ``h = x W1^T + b1``, ``a = f(h)``, ``z = a W2^T + b2``, ``r = dL/dz`` (``(softmax(z) - onehot)/B``
  for cross-entropy, ``2 (z - t)/(B C)`` for MSE):

  ``dh = x dW1^T + db1``, ``da = f'(h) dh``, ``dz = da W2^T + a dW2^T + db2``,
  ``dr = (p*dz - p (p.dz))/B`` (cross-entropy) or ``2 dz/(B C)`` (MSE),
  ``dgW2 = dr^T a + r^T da``, ``dgb2 = sum_b dr``, ``dga = dr W2 + r dW2``,
  ``dgh = dga f'(h) + (r W2) f''(h) dh``, ``dgW1 = dgh^T x``, ``dgb1 = sum_b dgh``.

  The two products with the input (``x dW1^T`` and ``dgh^T x``) carry almost all the work; each is
  one GEMM of shape (K*H) x D x B. ``f'`` and ``f''`` come from ``torch.func.jvp`` of the module's
  own activation, so any element-wise activation works.

:func:`make_hvp` picks the fast path when the model has that structure, else the generic one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .training import LossLike, ParamSpec

__all__ = ["GenericHVP", "MLPHVP", "make_hvp", "ELEMENTWISE_ACTIVATIONS"]

ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.ELU, nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Mish,
)


class GenericHVP:
    """``vmap(jvp(grad(loss)))`` over a block of tangents; any model, any loss."""

    name = "generic"

    def __init__(self, spec: ParamSpec, loss: LossLike) -> None:
        self.spec = spec
        self.loss_fn = spec.loss_fn(loss)
        self._grad = grad(self.loss_fn)

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._grad(theta, x, y)

    def context(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Any:
        return (theta, x, y)

    def to_blocks(self, V: torch.Tensor) -> list[torch.Tensor]:
        return [V]

    def from_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return blocks[0]

    def hvp_blocks(self, ctx: Any, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.hvp(*ctx, blocks[0])]

    def hvp(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``V @ H`` for a (K, n) block of tangents (H is symmetric, so rows are ``H v_k``)."""

        def g(th: torch.Tensor) -> torch.Tensor:
            return self._grad(th, x, y)

        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(g, (theta,), (v,))[1]

        return vmap(one)(V)


class MLPHVP:
    """Closed-form HVP for ``Sequential(Linear(D, H), act, Linear(H, C))`` (see the module doc).

    Tangent blocks use an internal layout in which the large products are tall-skinny GEMMs
    (K*H rows), the fastest orientation for BLAS: ``T1[k, h, i] = dW1_k[h, i]`` with column
    ``i = D`` holding ``db1_k`` (shape (K, H, D+1)), ``T2[k, c, j] = dW2_k[c, j]`` with column
    ``j = H`` holding ``db2_k`` (shape (K, C, H+1)); hidden-layer tangents are (K, H, B).
    """

    name = "mlp"

    def __init__(self, spec: ParamSpec, model: nn.Sequential, loss: str) -> None:
        self.spec = spec
        self.act = model[1]
        self.H, self.D = model[0].weight.shape
        self.C = model[2].weight.shape[0]
        self.loss = loss
        H, D, C = self.H, self.D, self.C
        self.slices = [(0, H * D), (H * D, H * D + H), (H * D + H, H * D + H + C * H), (H * D + H + C * H, spec.n)]

    # -- layouts ------------------------------------------------------------------------------------
    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        H, D, C = self.H, self.D, self.C
        (a0, a1), (b0, b1), (c0, c1), (d0, d1) = self.slices
        lead = v.shape[:-1]
        return (v[..., a0:a1].reshape(*lead, H, D), v[..., b0:b1], v[..., c0:c1].reshape(*lead, C, H), v[..., d0:d1])

    def to_blocks(self, V: torch.Tensor) -> list[torch.Tensor]:
        """(K, n) in ``parameters_to_vector`` order -> [T1 (K, H, D+1), T2 (K, C, H+1)]."""
        W1, b1, W2, b2 = self._split(V)
        return [torch.cat([W1, b1.unsqueeze(-1)], dim=-1), torch.cat([W2, b2.unsqueeze(-1)], dim=-1)]

    def from_blocks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        T1, T2 = blocks
        K = T1.shape[0]
        return torch.cat([T1[..., :-1].reshape(K, -1), T1[..., -1], T2[..., :-1].reshape(K, -1), T2[..., -1]], dim=1)

    # -- primal quantities ----------------------------------------------------------------------------
    def _primal(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        W1, b1, W2, b2 = self._split(theta)
        h = x @ W1.T + b1
        one = torch.ones_like(h)

        def d1(u: torch.Tensor) -> torch.Tensor:
            return jvp(self.act, (u,), (one,))[1]

        a, f1 = jvp(self.act, (h,), (one,))
        f2 = jvp(d1, (h,), (one,))[1]
        z = a @ W2.T + b2
        B = x.shape[0]
        if self.loss == "cross_entropy":
            p = torch.softmax(z, dim=-1)
            r = (p - torch.nn.functional.one_hot(y, self.C).to(z.dtype)) / B
        else:
            p = None
            t = torch.nn.functional.one_hot(y, self.C).to(z.dtype) if not y.is_floating_point() else y
            r = 2.0 * (z - t) / (B * self.C)
        ga = r @ W2
        ones = torch.ones(B, 1, dtype=x.dtype, device=x.device)
        return {
            "W2": W2, "x": x, "a": a, "f1": f1, "r": r, "ga": ga,
            "f1T": f1.T.contiguous(), "gaf2T": (ga * f2).T.contiguous(), "rT": r.T.contiguous(),
            "pT": None if p is None else p.T.contiguous(),
            "x_aug": torch.cat([x, ones], 1), "a_aug": torch.cat([a, ones], 1),
        }

    def context(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        return self._primal(theta, x, y)

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self._primal(theta, x, y)
        gh = c["ga"] * c["f1"]
        return torch.cat([(gh.T @ x).reshape(-1), gh.sum(0), (c["r"].T @ c["a"]).reshape(-1), c["r"].sum(0)])

    def hvp(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Rows ``H v_k`` for a (K, n) block, in ``parameters_to_vector`` order."""
        return self.from_blocks(self.hvp_blocks(self._primal(theta, x, y), self.to_blocks(V)))

    def hvp_blocks(self, c: dict[str, Any], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The HVP in the internal layout: 4 tall GEMMs (K*H or K*C rows), 3 batched small products."""
        T1, T2 = (b.contiguous() for b in blocks)
        H, D, C = self.H, self.D, self.C
        K = T1.shape[0]
        x_aug, a_aug, W2, f1T = c["x_aug"], c["a_aug"], c["W2"], c["f1T"]
        B = x_aug.shape[0]
        dh = (T1.view(K * H, D + 1) @ x_aug.T).view(K, H, B)  # GEMM 1 (bias via the ones column)
        da = dh * f1T
        dz = (T2.view(K * C, H + 1) @ a_aug.T).view(K, C, B)
        dz += torch.matmul(W2, da)
        if c["pT"] is not None:
            pT = c["pT"]
            pdz = dz.mul_(pT)
            dr = pdz.sub_(pT * pdz.sum(1, keepdim=True)).div_(B)
        else:
            dr = dz.mul_(2.0 / (B * C))
        G2 = (dr.view(K * C, B) @ a_aug).view(K, C, H + 1)
        G2[..., :H] += torch.matmul(c["rT"], da.transpose(1, 2))
        dga = (T2[..., :H].transpose(1, 2).reshape(K * H, C) @ c["rT"]).view(K, H, B)
        dga += torch.matmul(W2.T, dr)
        dgh = dga.mul_(f1T).addcmul_(dh, c["gaf2T"])
        G1 = (dgh.view(K * H, B) @ x_aug).view(K, H, D + 1)  # GEMM 2 (bias column via the ones column)
        return [G1, G2]


def mlp_structure(model: nn.Module) -> bool:
    """True when ``model`` is ``Sequential(Linear, element-wise activation, Linear)`` with biases."""
    if not isinstance(model, nn.Sequential) or len(model) != 3:
        return False
    l1, act, l2 = model
    return (
        isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear) and type(act) in ELEMENTWISE_ACTIVATIONS
        and l1.bias is not None and l2.bias is not None and l2.in_features == l1.out_features
        and not list(model.buffers())
    )


def make_hvp(model: nn.Module, spec: ParamSpec, loss: LossLike, method: str = "auto") -> GenericHVP | MLPHVP:
    """``method``: "auto" (fast path when supported), "mlp" (fast path, error if unsupported), "generic"."""
    if method not in ("auto", "mlp", "generic"):
        raise ValueError(f"The 'method' parameter must be one of 'auto', 'mlp', 'generic'. Got {method!r} instead.")
    fast_ok = mlp_structure(model) and isinstance(loss, str) and loss in ("cross_entropy", "mse")
    if method == "mlp" and not fast_ok:
        raise ValueError(
            "The 'method' parameter 'mlp' needs model = Sequential(Linear, element-wise activation, Linear) with biases "
            f"and loss 'cross_entropy' or 'mse'. Got model {type(model).__name__} and loss {loss!r} instead."
        )
    if fast_ok and method != "generic":
        return MLPHVP(spec, model, loss)  # type: ignore[arg-type]
    return GenericHVP(spec, loss)
