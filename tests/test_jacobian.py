"""Training Jacobian: exactness against finite differences, per-step products, torch.optim, fast == generic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dimscope.jacobian import TrainConfig, functional_train, training_jacobian
from dimscope.jacobian.core import TrainingJacobian, UnrolledTraining
from dimscope.jacobian.training import ParamSpec


def tiny(seed: int = 0, d: int = 3, h: int = 4, c: int = 3, act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), act or nn.GELU(approximate="tanh"), nn.Linear(h, c)).double()


def data(n: int = 24, d: int = 3, c: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


KW = dict(lr=0.2, momentum=0.9, schedule="cosine", batch_size=8, epochs=3, dtype=torch.float64)


def test_jacobian_equals_finite_differences() -> None:
    model, (X, y) = tiny(), data()
    tj = training_jacobian(model, X, y, **KW)
    cfg = tj.config
    th0 = tj.theta0
    eps = 1e-6
    E = eps * torch.eye(tj.n, dtype=torch.float64)
    # all 2n perturbed runs side by side (theta0 of shape (P, n))
    final = functional_train(model, X, y, cfg, theta0=torch.cat([th0 + E, th0 - E]), dtype=torch.float64, record=False).theta_final
    J_fd = ((final[: tj.n] - final[tj.n :]) / (2 * eps)).T
    assert tj.J.shape == (31, 31)
    assert torch.allclose(tj.J, J_fd, atol=1e-7, rtol=1e-6), (tj.J - J_fd).abs().max()
    # and the Jacobian is not trivially the identity
    assert (tj.J - torch.eye(31, dtype=torch.float64)).abs().max() > 1e-2


def test_jacobian_equals_product_of_per_step_jacobians_for_plain_gd() -> None:
    model, (X, y) = tiny(act=nn.Tanh()), data(n=16)
    lr, steps = 0.3, 6
    tj = training_jacobian(model, X, y, lr=lr, momentum=0.0, schedule=None, batch_size=16, epochs=steps, dtype=torch.float64)
    spec = ParamSpec(model)
    f = spec.loss_fn("cross_entropy")
    theta = tj.theta0.clone()
    P = torch.eye(spec.n, dtype=torch.float64)
    for _ in range(steps):
        H = torch.autograd.functional.hessian(lambda th: f(th, X, y), theta)
        P = (torch.eye(spec.n, dtype=torch.float64) - lr * H) @ P
        theta = theta - lr * torch.func.grad(f)(theta, X, y)
    assert torch.allclose(theta, tj.theta_final, atol=1e-12)
    assert torch.allclose(tj.J, P, atol=1e-10), (tj.J - P).abs().max()


@pytest.mark.parametrize(
    "opt_name,kw",
    [
        ("sgd", dict(lr=0.1, momentum=0.9, schedule="cosine")),
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule=None)),
        ("adam", dict(lr=1e-2, weight_decay=1e-3, schedule="cosine")),
        ("adamw", dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95), schedule=lambda t: 1.0 / (1 + t))),
    ],
)
@pytest.mark.parametrize("shuffle", [False, True])
def test_functional_loop_equals_torch_optim(opt_name: str, kw: dict, shuffle: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(approximate="tanh"), nn.Linear(7, 3))
    X = torch.randn(50, 5)
    y = torch.randint(0, 3, (50,))
    cfg = TrainConfig(optimizer=opt_name, batch_size=16, epochs=4, shuffle=shuffle, seed=3, **kw)
    ours = functional_train(model, X, y, cfg, dtype=torch.float32, record=False).theta_final

    ref = nn.Sequential(nn.Linear(5, 7), nn.GELU(approximate="tanh"), nn.Linear(7, 3))
    ref.load_state_dict(model.state_dict())
    base_lr = kw["lr"]
    if opt_name == "sgd":
        opt = torch.optim.SGD(ref.parameters(), lr=base_lr, momentum=kw["momentum"], nesterov=kw.get("nesterov", False),
                              weight_decay=kw.get("weight_decay", 0.0))
    elif opt_name == "adam":
        opt = torch.optim.Adam(ref.parameters(), lr=base_lr, weight_decay=kw["weight_decay"])
    else:
        opt = torch.optim.AdamW(ref.parameters(), lr=base_lr, weight_decay=kw["weight_decay"], betas=kw["betas"])
    T = 4 * (50 // 16)
    sched = kw["schedule"]
    if sched == "cosine":
        factor = lambda t: 0.5 * (1 + math.cos(math.pi * t / T))  # noqa: E731
    elif sched is None:
        factor = lambda t: 1.0  # noqa: E731
    else:
        factor = sched
    ls = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        order = torch.randperm(50, generator=g) if shuffle else torch.arange(50)
        for i in range(50 // 16):
            idx = order[i * 16 : (i + 1) * 16]
            opt.zero_grad()
            nn.functional.cross_entropy(ref(X[idx]), y[idx]).backward()
            opt.step()
            ls.step()
    theirs = torch.nn.utils.parameters_to_vector(ref.parameters()).detach()
    assert (ours - theirs).abs().max() < 1e-5
    assert (theirs - torch.nn.utils.parameters_to_vector(model.parameters())).abs().max() > 1e-3  # it trained
    # the model passed in is not modified
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), ParamSpec(model).vector(torch.float32))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.Tanh(), nn.SiLU()])
def test_fast_path_equals_generic_path(loss: str, act: nn.Module) -> None:
    model, (X, y) = tiny(d=4, h=5, c=3, act=act), data(n=20, d=4)
    a = training_jacobian(model, X, y, loss=loss, method="mlp", **{**KW, "epochs": 2})
    b = training_jacobian(model, X, y, loss=loss, method="generic", **{**KW, "epochs": 2})
    assert a.method == "mlp" and b.method == "generic"
    assert torch.allclose(a.J, b.J, atol=1e-12), (a.J - b.J).abs().max()


def test_adam_jacobian_fast_equals_generic_and_chunking_is_exact() -> None:
    model, (X, y) = tiny(), data()
    kw = {**KW, "optimizer": "adam", "lr": 0.01}
    a = training_jacobian(model, X, y, method="mlp", chunk=7, **kw)
    b = training_jacobian(model, X, y, method="generic", chunk=31, **kw)
    assert torch.allclose(a.J, b.J, atol=1e-11)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_jacobian_is_finite_when_a_gradient_stays_zero(optimizer: str) -> None:
    """An input column that is always 0 (as in load_digits) gives its first-layer weights a gradient
    of exactly 0 at every step: v = 0, where d sqrt(v)/dv is infinite; J must still be exact."""
    model, (X, y) = tiny(), data()
    X[:, 0] = 0.0
    kw = {**KW, "optimizer": optimizer, "lr": 0.01, "weight_decay": 0.01 if optimizer == "adamw" else 0.0}
    for method in ("mlp", "generic"):
        tj = training_jacobian(model, X, y, method=method, **kw)
        assert torch.isfinite(tj.J).all()
        eps = 1e-6
        E = eps * torch.eye(tj.n, dtype=torch.float64)
        final = functional_train(model, X, y, tj.config, theta0=torch.cat([tj.theta0 + E, tj.theta0 - E]), dtype=torch.float64,
                                 record=False).theta_final
        J_fd = ((final[: tj.n] - final[tj.n :]) / (2 * eps)).T
        assert torch.allclose(tj.J, J_fd, atol=1e-7, rtol=1e-6), (tj.J - J_fd).abs().max()


def test_generic_path_on_other_models_and_adjoint_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    X, y = data(n=16, c=2)
    run = UnrolledTraining(model, X, y, TrainConfig(lr=0.1, batch_size=8, epochs=2), dtype=torch.float64)
    assert run.hvp_op.name == "generic"
    V = torch.randn(3, run.n, dtype=torch.float64)
    U = torch.randn(3, run.n, dtype=torch.float64)
    # <J v, u> == <v, J^T u>
    assert torch.allclose((run.jvp(V) * U).sum(1), (V * run.vjp(U)).sum(1), atol=1e-10)


def test_regions_and_alignment_on_a_known_matrix() -> None:
    sig = torch.tensor([3.0, 1.5, 1.05, 1.0, 0.999, 0.95, 0.5, 0.01], dtype=torch.float64)
    Q1, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    J = Q1 @ torch.diag(sig) @ Q1.T  # symmetric: u_i = v_i, alignment 1
    tj = TrainingJacobian(J=J, theta0=torch.zeros(8), theta_final=torch.zeros(8))
    assert np.allclose(tj.singular_values.numpy(), sig.numpy())
    r = tj.regions(0.1)
    assert r.counts == {"chaotic": 2, "bulk": 4, "stable": 2}
    assert r.bulk_share == 0.5
    assert tj.regions(0.01).counts == {"chaotic": 3, "bulk": 2, "stable": 3}
    assert np.allclose(np.abs(tj.alignment()), 1.0)
    with pytest.raises(ValueError, match="'tau' parameter of regions must be a float > 0.0. Got -1"):
        tj.regions(-1)


def test_bad_input_errors() -> None:
    model, (X, y) = tiny(), data()
    with pytest.raises(ValueError, match="'optimizer' parameter of training_jacobian must be one of 'sgd', 'adam', 'adamw'. Got 'rmsprop'"):
        training_jacobian(model, X, y, optimizer="rmsprop")
    with pytest.raises(ValueError, match="'method' parameter 'mlp' needs model = Sequential"):
        training_jacobian(nn.Sequential(nn.Linear(3, 3)).double(), X, y, method="mlp", batch_size=8)
    with pytest.raises(ValueError, match="'batch_size' parameter of training_jacobian must be <= the number of samples"):
        training_jacobian(model, X, y, batch_size=100)
    with pytest.raises(ValueError, match="'dtype' parameter of training_jacobian must be torch.float32 or torch.float64"):
        training_jacobian(model, X, y, dtype=torch.float16, batch_size=8)
    with pytest.raises(ValueError, match="'schedule' parameter of training_jacobian must be None"):
        training_jacobian(model, X, y, schedule="linear", batch_size=8)


def test_matrix_free_top_k_matches_dense_on_a_1000_parameter_model() -> None:
    from dimscope.jacobian.matrix_free import bulk_size_slq, top_singular

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 10)).double()  # 1306 params
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (96,), generator=g)
    cfg = TrainConfig(lr=0.5, momentum=0.9, batch_size=48, epochs=2)
    run = UnrolledTraining(model, X, y, cfg, dtype=torch.float64)
    assert run.n == 1306
    dense = run.dense()
    s_dense = torch.linalg.svdvals(dense).numpy()
    top = top_singular(run, k=20, solver="lobpcg", maxiter=40)
    rel = np.abs(top.values - s_dense[:20]) / s_dense[:20]
    assert rel.max() < 1e-3, rel
    # singular vectors: |u_i . (J v_i)| / sigma_i == 1
    assert np.allclose(np.abs(np.einsum("ni,ni->i", top.U, dense.numpy() @ top.Vh.T)) / top.values, 1, atol=1e-4)
    est = bulk_size_slq(run, tau=0.1, probes=6, steps=40)
    true_bulk = int((np.abs(s_dense - 1) <= 0.1).sum())
    assert abs(est.bulk - true_bulk) < max(4 * est.stderr, 0.1 * run.n), (est, true_bulk)
