"""Function-space ε-rank against Gram matrices known in closed form, and quadrature accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import dimscope
from dimscope.staircase import (
    FunctionSpaceEpsRank,
    Quadrature,
    eps_rank_function_space,
    gauss_legendre,
    gram_eigenvalues,
    monte_carlo,
    quadrature,
    trapezoid,
)
from dimscope.staircase.epsrank import convention_name


class Legendre(nn.Module):
    """Outputs P_0 … P_{n-1} (Legendre polynomials) of x, times a learnable scale."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.scale = nn.Parameter(torch.ones(()))
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0]
        P = [torch.ones_like(x), x]
        for k in range(1, self.n - 1):
            P.append(((2 * k + 1) * x * P[-1] - k * P[-2]) / (k + 1))
        return self.out(self.scale * torch.stack(P[: self.n], 1))


class Sines(nn.Module):
    """sin(kπx), k = 1…n (1-D) or sin(kπx)·sin(lπy), k, l = 1…n (2-D): orthonormal on [-1, 1]^d."""

    def __init__(self, n: int, dim: int = 1) -> None:
        super().__init__()
        self.n, self.dim = n, dim
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, self.n + 1, dtype=x.dtype)
        s = torch.sin(math.pi * x[:, :1] * k)
        if self.dim == 2:
            t = torch.sin(math.pi * x[:, 1:2] * k)
            s = (s[:, :, None] * t[:, None, :]).reshape(x.shape[0], -1)
        return self.out(s)


def relu_kinks(b: np.ndarray) -> nn.Sequential:
    """ReLU(x − b_j): hand-set kinks."""
    lin = nn.Linear(1, len(b)).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(torch.tensor(-b))
    return nn.Sequential(lin, nn.ReLU())


def relu_gram(b: np.ndarray) -> np.ndarray:
    """M_ij = ∫_{max(b_i, b_j)}^1 (x − b_i)(x − b_j) dx on [-1, 1] (all b in [-1, 1])."""
    bi, bj = np.meshgrid(b, b, indexing="ij")
    m = np.maximum(bi, bj)

    def F(x: np.ndarray) -> np.ndarray:
        return x**3 / 3 - (bi + bj) * x**2 / 2 + bi * bj * x

    return F(np.ones_like(m)) - F(m)


LEGENDRE = 2.0 / (2 * np.arange(10) + 1)  # ∫_{-1}^{1} P_n² = 2/(2n+1), off-diagonals 0


def test_legendre_gauss_is_exact_and_counts_by_eps():
    model = Legendre(10).double()
    q = gauss_legendre((-1, 1), 12, dtype=torch.float64)  # exact for degree <= 23
    r = eps_rank_function_space(model, "out", q, eps=0.15)
    np.testing.assert_allclose(np.sort(r.eigenvalues), np.sort(LEGENDRE), rtol=1e-12)
    # 2/(2n+1) > 0.15  <=>  n <= 6  -> 7 eigenvalues
    assert r.count == 7 and r.at(0.1) == 10 and r.at(1.0) == 1
    assert (r.eps, r.weights, r.normalize, r.n_points, r.n_neurons) == (0.15, "gauss", False, 12, 10)
    assert r.weight_sum == pytest.approx(2.0)
    assert r.layer == "out"


def test_legendre_trapezoid_and_monte_carlo_accuracy():
    model = Legendre(10).double()
    tr = eps_rank_function_space(model, "out", trapezoid((-1, 1), 4001, dtype=torch.float64))
    # trapezoid error of ∫P_n² (Euler–Maclaurin): h²/12 · [(P_n²)']_{-1}^{1} = h² n(n+1)/6 (off-diagonal
    # errors move the eigenvalues only at second order)
    h = 2 / 4000
    n = np.arange(10)
    err = tr.eigenvalues[np.argsort(-tr.eigenvalues)] - LEGENDRE
    np.testing.assert_allclose(err[1:], h**2 * n[1:] * (n[1:] + 1) / 6, rtol=1e-2)
    assert abs(err[0]) < 1e-10
    mc = eps_rank_function_space(model, "out", monte_carlo((-1, 1), 200_000, seed=1, dtype=torch.float64))
    # Monte Carlo: relative error ~ sqrt(var/N); 3 % is > 5 sigma here
    np.testing.assert_allclose(np.sort(mc.eigenvalues), np.sort(LEGENDRE), rtol=3e-2)
    assert mc.weights == "monte_carlo" and mc.weight_sum == pytest.approx(2.0)


def test_normalize_gives_unit_eigenvalues_for_orthogonal_and_scale_free_counts():
    model = Legendre(10).double()
    q = gauss_legendre((-1, 1), 12, dtype=torch.float64)
    with torch.no_grad():
        model.scale.fill_(1e-3)
    raw = eps_rank_function_space(model, "out", q, eps=1e-3)
    np.testing.assert_allclose(np.sort(raw.eigenvalues), np.sort(LEGENDRE) * 1e-6, rtol=1e-10)
    assert raw.count == 0  # a tiny scale hides every neuron under the absolute threshold
    nrm = eps_rank_function_space(model, "out", q, eps=1e-3, normalize=True)
    np.testing.assert_allclose(nrm.eigenvalues, np.ones(10), rtol=1e-10)
    assert nrm.count == 10 and nrm.normalize


def test_orthonormal_sines_1d_and_2d_tensor_trapezoid():
    r1 = eps_rank_function_space(Sines(8).double(), "out", trapezoid((-1, 1), 257, dtype=torch.float64))
    np.testing.assert_allclose(r1.eigenvalues, np.ones(8), atol=1e-12)  # periodic: trapezoid is exact
    q2 = trapezoid([(-1, 1), (-1, 1)], 65, dtype=torch.float64)
    assert q2.n_points == 65 * 65 and q2.volume == pytest.approx(4.0) and q2.shape == (65, 65)
    r2 = eps_rank_function_space(Sines(5, dim=2).double(), "out", q2)
    np.testing.assert_allclose(r2.eigenvalues, np.ones(25), atol=1e-12)
    assert r2.count == 25


def test_hand_set_relu_kinks_match_closed_form_gram():
    b = np.array([-0.9, -0.5, -0.1, 0.0, 0.3, 0.75])
    model = relu_kinks(b)
    expected = np.sort(np.linalg.eigvalsh(relu_gram(b)))[::-1]
    r = eps_rank_function_space(model, "1", trapezoid((-1, 1), 8001, dtype=torch.float64), eps=1e-4)
    np.testing.assert_allclose(r.eigenvalues, expected, rtol=1e-5, atol=1e-9)
    assert r.count == int(np.sum(expected > 1e-4))
    # two kinks closer together → nearly dependent functions → the smallest eigenvalue collapses
    b2 = np.array([-0.5, -0.5 + 1e-3])
    ev = np.sort(np.linalg.eigvalsh(relu_gram(b2)))
    r2 = eps_rank_function_space(relu_kinks(b2), "1", trapezoid((-1, 1), 8001, dtype=torch.float64), eps=1e-4)
    assert r2.count == 1 and ev[0] < 1e-6 < ev[1]


def test_uniform_and_user_weights():
    x = torch.linspace(-1, 1, 1001, dtype=torch.float64)[:, None]
    model = Sines(4).double()
    uni = eps_rank_function_space(model, "out", x)
    assert uni.weights == "uniform" and uni.weight_sum == pytest.approx(1.0)
    # mean of sin^2 over the uniform points = 1/2 → eigenvalues ≈ 1/2
    np.testing.assert_allclose(uni.eigenvalues, 0.5, atol=2e-3)
    w = np.full(1001, 4.0 / 1000)
    user = eps_rank_function_space(model, "out", x, weights=w)
    assert user.weights == "user"
    np.testing.assert_allclose(user.eigenvalues, 4 * uni.eigenvalues * 1001 / 1000, rtol=1e-12)


def test_quadrature_rules_accuracy():
    f = np.exp
    exact = math.e - 1 / math.e
    errs = [abs(trapezoid((-1, 1), n).integrate(f(trapezoid((-1, 1), n).points.double().numpy()[:, 0])) - exact) for n in (65, 129)]
    assert 3.8 < errs[0] / errs[1] < 4.2  # second order
    q = gauss_legendre((0, 2), 5, dtype=torch.float64)
    x = q.points.numpy()[:, 0]
    assert q.integrate(x**9) == pytest.approx(2**10 / 10, rel=1e-13)  # exact to degree 2n-1
    mc = monte_carlo([(0, 1), (0, 2)], 40_000, seed=3)
    p = mc.points.double().numpy()
    val = mc.integrate(p[:, 0] * p[:, 1])  # ∫∫ x y = 1/2 · 2 = 1
    assert mc.volume == pytest.approx(2.0) and abs(val - 1.0) < 4 * math.sqrt((4 / 9 * 2 * 2 - 1) / 40_000) + 1e-3
    assert quadrature((-1, 1), 9, kind="gauss").kind == "gauss"
    assert quadrature([(-1, 1), (0, 1)], (3, 4), kind="monte_carlo").n_points == 12


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, q: eps_rank_function_space(m, "out", q, eps=-1.0), r"'eps' parameter of eps_rank_function_space must be a float >= 0.0. Got -1.0"),
        (lambda m, q: eps_rank_function_space(m, "out", q.points, weights=np.ones(3)), r"'weights' parameter .* one weight per point \(33\). Got 3"),
        (lambda m, q: eps_rank_function_space(m, "out", q.points, weights=-np.ones(33)), r"'weights' parameter .* finite and >= 0"),
        (lambda m, q: eps_rank_function_space(m, "nope", q), r"nope"),
        (lambda m, q: eps_rank_function_space(m, "out", "points"), r"'points' parameter of eps_rank_function_space must be a Quadrature"),
        (lambda m, q: trapezoid((1, -1), 5), r"'domain' parameter of trapezoid must have finite bounds with a < b"),
        (lambda m, q: trapezoid((-1, 1), 1), r"'n' parameter of trapezoid must be an int >= 2. Got 1"),
        (lambda m, q: quadrature((-1, 1), 5, kind="simpson"), r"'kind' parameter of quadrature must be one of"),
    ],
)
def test_errors_name_the_parameter(call, match):
    model = Legendre(4)
    q = trapezoid((-1, 1), 33)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model, q)


def test_top_level_export_and_convention_names():
    assert dimscope.eps_rank_function_space is eps_rank_function_space
    assert convention_name(1e-3) == "function/eps=1e-3"
    assert convention_name(2.5e-2, normalize=True) == "function/eps=2.5e-2/normalized"
    assert isinstance(trapezoid((-1, 1), 3), Quadrature)
    np.testing.assert_allclose(gram_eigenvalues(np.eye(3), [1.0, 2.0, 3.0]), [3.0, 2.0, 1.0])


def test_tracker_extension_writes_counts_spectra_and_manifest(tmp_path):
    model = nn.Sequential()
    model.add_module("leg", Legendre(10))
    model.add_module("head", nn.Linear(10, 1))
    q = gauss_legendre((-1, 1), 12)
    ext = FunctionSpaceEpsRank(q, layers=["leg.out"], every=2, eps=[0.15, 1e-3])
    opt = torch.optim.SGD([model.leg.scale], lr=0.0)
    with dimscope.Tracker(model, probe=q.points, every=2, layers=["head"], run=str(tmp_path / "r"), background=True, extensions=[ext]) as tr:
        for step in range(6):
            if step == 4:
                with torch.no_grad():
                    model.leg.scale.fill_(0.5)  # eigenvalues × 1/4 → 2/(2n+1)/4 > 0.15 only for n = 0, 1
            opt.step()
            tr.step(step, loss=1.0)
    run = dimscope.open_run(tmp_path / "r")
    s = run.metric("eps_rank", "leg.out", convention="function/eps=1.5e-1")
    assert s.to_dict() == {0: 7.0, 2: 7.0, 4: 2.0}
    assert run.metric("eps_rank", "leg.out", convention="function/eps=1e-3").to_dict() == {0: 10.0, 2: 10.0, 4: 10.0}
    fs = run.scalars(space="activation").query("layer == 'leg.out'")  # 12 quadrature points x 10 neurons, absolute ε
    assert len(fs) == 6 and (fs.n_samples == 12).all() and (fs.n_features == 10).all()
    assert sorted(json.loads(p)["eps_rank"]["eps"] for p in fs.params) == [1e-3] * 3 + [0.15] * 3
    man = run.manifest["function_eps_rank"]
    assert man["eps"] == [0.15, 1e-3] and man["normalize"] is False and man["quadrature"]["kind"] == "gauss"
    assert man["quadrature"]["weight_sum"] == pytest.approx(2.0)
    spec = run.spectra("leg.out", convention="function")
    np.testing.assert_allclose(np.sort(spec.loc[4].values), np.sort(LEGENDRE) / 4, rtol=1e-6)
    rec = run.recompute("eps_rank", "leg.out", convention="function", eps=0.08, relative=False)
    assert rec.set_index("step")["value"].to_dict() == {0: 10.0, 2: 10.0, 4: 3.0}
    assert [h["eps_rank"] for h in ext.history if h["eps"] == 0.15] == [7.0, 7.0, 2.0]
