"""A functional training loop on ``torch.func`` that reproduces ``torch.optim`` exactly.

Parameters live in one flat vector ``theta`` ordered as
``torch.nn.utils.parameters_to_vector(model.parameters())``. One optimizer step is a pure function
``(theta, grad, state, lr, t) -> (theta', state')`` applied element-wise, so its forward tangent and
its adjoint are exact (``torch.func.jvp`` / ``vjp``), and the whole run can be differentiated.

Conventions (the same as ``torch.optim`` with default arguments):

* SGD: ``g <- g + wd*theta``; heavy-ball ``buf <- mu*buf + g`` (``buf_0 = 0``, so the first step
  gives ``buf = g`` as torch does, no dampening); ``theta <- theta - lr*buf``, or with Nesterov
  ``theta <- theta - lr*(g + mu*buf)``.
* Adam: ``g <- g + wd*theta``; ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``;
  ``theta <- theta - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`` with ``t = step + 1``.
* AdamW: as Adam without the ``wd*theta`` term, after ``theta <- theta*(1 - lr*wd)``.
* Schedules: ``lr_t = lr`` (``schedule=None``), ``lr_t = lr * 1/2 (1 + cos(pi t / T))`` for
  ``t = 0 .. T-1`` (``"cosine"``, T the number of steps), ``lr_t = lr * schedule(t)`` for a
  callable schedule, or ``lr_t = lr(t)`` when ``lr`` itself is a callable.
* Batches: ``shuffle=False`` takes rows ``[i*B, (i+1)*B)`` in order, the same order every epoch;
  ``shuffle=True`` draws one ``torch.randperm`` per epoch from a generator seeded with ``seed``.
  An incomplete last batch is dropped (``drop_last=True``) or used.
* Losses: ``"cross_entropy"`` (mean softmax cross-entropy on integer labels), ``"mse"`` (mean over
  samples and outputs of ``(z - t)^2`` where ``t`` is the one-hot of integer labels, or the float
  targets themselves), or a callable ``loss(outputs, targets) -> scalar``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .._validation import check_choice, check_float, check_int

__all__ = [
    "TrainConfig",
    "FunctionalOptimizer",
    "make_optimizer",
    "lr_at",
    "batch_indices",
    "loss_value",
    "ParamSpec",
    "functional_train",
    "Trajectory",
]

LrLike = Union[float, Callable[[int], float]]
LossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the model and the data (see module doc)."""

    optimizer: str = "sgd"
    lr: LrLike = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Any = "cosine"
    batch_size: int = 64
    epochs: int = 25
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = True
    loss: LossLike = "cross_entropy"

    def validated(self, n_samples: int) -> "TrainConfig":
        owner = "training_jacobian"
        check_choice(self.optimizer, "optimizer", OPTIMIZERS, owner=owner)
        if not callable(self.lr):
            check_float(self.lr, "lr", low=0.0, owner=owner)
        elif self.schedule not in (None, "constant"):
            raise ValueError(
                f"The 'schedule' parameter of {owner} must be None when 'lr' is a callable. Got {self.schedule!r} instead."
            )
        if not (self.schedule in (None, "constant", "cosine") or callable(self.schedule)):
            raise ValueError(
                f"The 'schedule' parameter of {owner} must be None, 'constant', 'cosine' or a callable. "
                f"Got {self.schedule!r} instead."
            )
        check_float(self.momentum, "momentum", low=0.0, high=1.0, high_inclusive=False, owner=owner)
        check_float(self.weight_decay, "weight_decay", low=0.0, owner=owner)
        check_float(self.eps, "eps", low=0.0, owner=owner)
        check_int(self.batch_size, "batch_size", min_value=1, owner=owner)
        check_int(self.epochs, "epochs", min_value=1, owner=owner)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(
                f"The 'nesterov' parameter of {owner} needs optimizer='sgd' and momentum > 0. "
                f"Got optimizer={self.optimizer!r}, momentum={self.momentum!r} instead."
            )
        if isinstance(self.loss, str):
            check_choice(self.loss, "loss", LOSSES, owner=owner)
        elif not callable(self.loss):
            raise TypeError(f"The 'loss' parameter of {owner} must be 'cross_entropy', 'mse' or a callable. Got {self.loss!r} instead.")
        if self.batch_size > n_samples:
            raise ValueError(
                f"The 'batch_size' parameter of {owner} must be <= the number of samples ({n_samples}). Got {self.batch_size} instead."
            )
        return self

    def steps_per_epoch(self, n_samples: int) -> int:
        return n_samples // self.batch_size if self.drop_last else -(-n_samples // self.batch_size)

    def n_steps(self, n_samples: int) -> int:
        return self.epochs * self.steps_per_epoch(n_samples)


def lr_at(cfg: TrainConfig, t: int, n_steps: int) -> float:
    """The learning rate of step ``t`` (0-based) of ``n_steps``."""
    if callable(cfg.lr):
        return float(cfg.lr(t))
    if cfg.schedule in (None, "constant"):
        return float(cfg.lr)
    if cfg.schedule == "cosine":
        return float(cfg.lr) * 0.5 * (1.0 + math.cos(math.pi * t / n_steps))
    return float(cfg.lr) * float(cfg.schedule(t))


def batch_indices(cfg: TrainConfig, n_samples: int) -> Iterator[torch.Tensor]:
    """The row indices of every mini-batch, in training order."""
    B = cfg.batch_size
    per = cfg.steps_per_epoch(n_samples)
    gen = torch.Generator().manual_seed(int(cfg.seed)) if cfg.shuffle else None
    for _ in range(cfg.epochs):
        order = torch.randperm(n_samples, generator=gen) if gen is not None else torch.arange(n_samples)
        for i in range(per):
            yield order[i * B : min((i + 1) * B, n_samples)]


def loss_value(loss: LossLike, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The scalar training loss (see the module doc for the conventions)."""
    if callable(loss):
        return loss(out, y)
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, y)
    target = torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype) if not y.is_floating_point() else y
    return torch.mean((out - target) ** 2)


# --------------------------------------------------------------------------------------------------
# optimizers as pure element-wise updates on flat vectors
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FunctionalOptimizer:
    """A pure optimizer step. ``state`` is a tuple of flat tensors, zero at the start.

    ``linear`` is True when the update is linear in (theta, grad, state) for a fixed lr (SGD): then
    its tangent is the update itself applied to the tangents.
    """

    name: str
    n_state: int
    linear: bool
    update: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = field(repr=False)

    def init_state(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros_like(theta) for _ in range(self.n_state))


def make_optimizer(cfg: TrainConfig) -> FunctionalOptimizer:
    wd, mu = float(cfg.weight_decay), float(cfg.momentum)
    if cfg.optimizer == "sgd":
        nesterov = bool(cfg.nesterov)

        def sgd(theta, g, state, lr, t):  # noqa: ANN001, ANN202
            if wd:
                g = g + wd * theta
            if mu == 0:
                return theta - lr * g, state
            buf = mu * state[0] + g
            step = g + mu * buf if nesterov else buf
            return theta - lr * step, (buf,)

        return FunctionalOptimizer("sgd", 1 if mu else 0, True, sgd)
    b1, b2 = (float(b) for b in cfg.betas)
    eps, decoupled = float(cfg.eps), cfg.optimizer == "adamw"

    def adam(theta, g, state, lr, t):  # noqa: ANN001, ANN202
        m, v = state
        if decoupled:
            theta = theta * (1 - lr * wd)
        elif wd:
            g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        k = t + 1
        bc1, bc2 = 1 - b1**k, 1 - b2**k
        # sqrt with a zero derivative at v = 0: there v's tangent is 0 too (every gradient so far was
        # exactly 0, e.g. the weights of an input that is always zero), and 0 * inf would make J NaN
        pos = v > 0
        denom = torch.where(pos, torch.sqrt(torch.where(pos, v, 1.0)), 0.0) / math.sqrt(bc2) + eps
        return theta - (lr / bc1) * m / denom, (m, v)

    return FunctionalOptimizer(cfg.optimizer, 2, False, adam)


# --------------------------------------------------------------------------------------------------
# flat parameter vector <-> module parameters
# --------------------------------------------------------------------------------------------------
class ParamSpec:
    """Maps the flat vector (``parameters_to_vector`` order) to ``functional_call`` dictionaries."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.n = sum(self.sizes)
        self.buffers = dict(model.named_buffers())
        if self.n == 0:
            raise ValueError("The 'model' parameter of training_jacobian must have parameters. Got a model with none.")
        self.device = next(model.parameters()).device  # where the functional training runs: the model's device

    def vector(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().to(dtype).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = theta[i : i + size].view(shape)
            i += size
        return out

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self.unflatten(theta)
        if self.buffers:
            params = {**params, **{k: v.to(theta.dtype) if v.is_floating_point() else v for k, v in self.buffers.items()}}
        return functional_call(self.model, params, (x,))

    def loss_fn(self, loss: LossLike) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_value(loss, self.forward(theta, x), y)

        return f


@dataclass
class Trajectory:
    """The primal run: ``thetas[t]`` and ``states[t]`` are the values *before* step ``t``."""

    thetas: list[torch.Tensor]
    states: list[tuple[torch.Tensor, ...]]
    batches: list[torch.Tensor]
    lrs: list[float]
    losses: list[float]
    theta_final: torch.Tensor


def functional_train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    theta0: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    record: bool = True,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Trajectory:
    """Run the training functionally from ``theta0`` (default: the model's current parameters).

    The model itself is never modified. ``project`` (optional) maps each gradient before the optimizer
    step (used for training restricted to a subspace). With ``record=False`` only the final
    parameters and the losses are kept. ``theta0`` of shape (P, n) trains P copies side by side
    (``vmap`` over the gradient; same batches and schedule), e.g. several perturbed initializations.
    """
    cfg = cfg.validated(len(X))
    spec = ParamSpec(model)
    theta = spec.vector(dtype) if theta0 is None else theta0.detach().to(device=spec.device, dtype=dtype).clone()
    if theta.shape[-1:] != (spec.n,) or theta.dim() > 2:
        raise ValueError(f"The 'theta0' parameter must have shape ({spec.n},) or (P, {spec.n}). Got {tuple(theta.shape)} instead.")
    X = X.to(device=spec.device, dtype=dtype)  # the data follow the model
    y = y.to(device=spec.device, dtype=dtype) if y.is_floating_point() else y.to(spec.device)
    opt = make_optimizer(cfg)
    state = opt.init_state(theta)
    n_steps = cfg.n_steps(len(X))
    gfn = grad_and_value(spec.loss_fn(cfg.loss))
    if theta.dim() == 2:
        gfn = vmap(gfn, in_dims=(0, None, None))
    traj = Trajectory([], [], [], [], [], theta)
    for t, idx in enumerate(batch_indices(cfg, len(X))):
        lr = lr_at(cfg, t, n_steps)
        xb, yb = X[idx], y[idx]
        if record:
            traj.thetas.append(theta)
            traj.states.append(state)
            traj.batches.append(idx)
        traj.lrs.append(lr)
        with torch.no_grad():
            g, value = gfn(theta, xb, yb)
            if project is not None:
                g = project(g)
            traj.losses.append(float(value) if value.dim() == 0 else value.tolist())
            theta, state = opt.update(theta, g, state, lr, t)
    traj.theta_final = theta
    return traj
