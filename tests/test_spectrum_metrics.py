"""Metrics against analytic spectra, centered and uncentered, both sides of the Gram trick."""

import math
import re

import numpy as np
import pytest
import torch

import dimscope
from dimscope.metrics import (
    DEFAULT_METRICS,
    compute_metrics,
    effective_rank,
    energy_rank,
    eps_rank,
    measure_ndt,
    moment_metrics,
    ndt_participation_ratio,
    nuclear_ratio,
    participation_ratio,
    rankme,
    stable_rank,
)
from dimscope.spectrum import NonFiniteError, Spectrum, batch_spectra, spectrum, spectrum_from_gram, weight_spectrum

REL = 1e-6


def planted(n: int, eigs: np.ndarray, *, centered: bool = True, seed: int = 0) -> np.ndarray:
    """An n x d matrix whose (centered or uncentered) covariance has exactly the eigenvalues ``eigs``."""
    rng = np.random.default_rng(seed)
    d = len(eigs)
    k = int(np.count_nonzero(eigs))
    assert k <= n - (1 if centered else 0)
    # Orthonormal columns in sample space, orthogonal to the all-ones vector when centered.
    A = rng.standard_normal((n, k))
    if centered:
        A -= A.mean(0)
    Q, _ = np.linalg.qr(A)
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))  # random rotation in feature space
    denom = (n - 1) if centered else n
    Z = np.zeros((n, d))
    Z[:, :k] = Q * np.sqrt(eigs[:k] * denom)
    X = Z @ R.T
    if centered:
        X += rng.standard_normal(d) * 5.0  # an offset that centering must remove
    return X


def analytic(eigs, m):
    """Closed forms; RankMe's +1e-7 applies to all m = min(n-1, d) eigenvalues, zeros included."""
    full = np.zeros(m)
    full[: min(m, len(eigs))] = np.sort(np.asarray(eigs, float))[::-1][:m]
    lam = full[full > 0]
    p = lam / lam.sum()
    sv = np.sqrt(lam)
    svf = np.sqrt(full)
    q = svf / svf.sum() + 1e-7
    return {
        "stable_rank": lam.sum() / lam.max(),
        "participation_ratio": lam.sum() ** 2 / (lam**2).sum(),
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "rankme": math.exp(-(q * np.log(q)).sum()),
        "nuclear_ratio": sv.sum() / sv.max(),
    }


CASES = {
    "isotropic": np.ones(20),
    "rank3": np.array([4.0, 2.0, 1.0] + [0.0] * 17),
    "given": np.array([10.0, 5.0, 2.5, 1.25, 0.6, 0.3, 0.1, 0.05]),
}


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [12, 200])  # n < d (XXᵀ side) and n > d (XᵀX side) for 20-d cases
def test_metrics_equal_analytic_values(case, center, n):
    eigs = np.sort(CASES[case])[::-1]
    if np.count_nonzero(eigs) > n - 1:
        pytest.skip("more planted directions than samples")
    X = planted(n, eigs, centered=center)
    s = spectrum(torch.tensor(X), center=center)
    want = analytic(eigs, min(n - (1 if center else 0), len(eigs)))
    got = compute_metrics(s)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=REL), name
    # the spectrum itself
    k = np.count_nonzero(eigs)
    np.testing.assert_allclose(s.values[:k], eigs[:k], rtol=1e-8)
    assert np.all(s.values[k:] < 1e-9 * eigs[0])
    assert s.ceiling == min(n - (1 if center else 0), len(eigs))
    assert len(s.values) == s.ceiling


def test_gram_trick_both_sides_agree():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 50)) @ np.diag(np.linspace(1, 3, 50))
    wide = spectrum(torch.tensor(X))  # n < d: n x n Gram
    C = np.cov(X, rowvar=False)  # d x d covariance with n - 1
    ref = np.sort(np.linalg.eigvalsh(C))[::-1][:29]
    np.testing.assert_allclose(wide.values, ref, rtol=1e-8, atol=1e-10)
    Xt = X[:, :10]  # n > d: d x d
    tall = spectrum(torch.tensor(Xt))
    np.testing.assert_allclose(tall.values, np.sort(np.linalg.eigvalsh(np.cov(Xt, rowvar=False)))[::-1], rtol=1e-8)
    assert tall.ceiling == 10 and wide.ceiling == 29


def test_eps_rank_relative_and_absolute():
    s = Spectrum(np.array([1.0, 0.5, 1e-2, 1e-4, 1e-6]), 10, 5)
    assert eps_rank(s) == 3  # > 1e-3 * 1
    assert eps_rank(s, eps=1e-5) == 4
    assert eps_rank(s, eps=0.6) == 1
    s2 = Spectrum(np.array([100.0, 10.0, 1.0, 0.1]), 10, 4)
    assert eps_rank(s2, eps=0.5, relative=False) == 3
    assert eps_rank(s2, eps=0.5, relative=True) == 1  # only 100 > 50
    assert eps_rank(s2, eps=0.05, relative=True) == 2  # > 5
    with pytest.raises(ValueError, match="'eps' parameter of eps_rank"):
        eps_rank(s, eps=-1)


def test_energy_rank_thresholds():
    s = Spectrum(np.array([5.0, 3.0, 1.0, 1.0]), 10, 4)  # cumulative 0.5, 0.8, 0.9, 1.0
    assert energy_rank(s) == 3  # exactly 90 % reached at k = 3
    assert energy_rank(s, q=0.5) == 1
    assert energy_rank(s, q=0.81) == 3
    assert energy_rank(s, q=0.95) == 4
    with pytest.raises(ValueError, match="'q' parameter of energy_rank"):
        energy_rank(s, q=1.5)


def test_zero_spectrum_gives_zero_metrics():
    X = torch.ones(10, 4)
    got = dimscope.measure(X)
    assert set(got) == set(DEFAULT_METRICS)
    assert all(v == 0.0 for v in got.values())


def test_truncated_spectrum_keeps_trace_for_stable_rank():
    s = Spectrum(np.array([4.0, 2.0, 1.0, 1.0]), 10, 4)
    t = s.top(2)
    assert t.truncated and not s.truncated
    assert stable_rank(t) == pytest.approx(stable_rank(s))
    assert participation_ratio(t) != pytest.approx(participation_ratio(s))


def test_ndt_convention_is_uncentered_singular_value_pr():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((64, 32)) + 2.0
    sv = np.linalg.svd(X, compute_uv=False)
    got = measure_ndt(torch.tensor(X))
    assert got["participation_ratio"] == pytest.approx(sv.sum() ** 2 / (sv**2).sum(), rel=REL)
    assert got["stable_rank"] == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=REL)
    assert got["nuclear_norm_ratio"] == pytest.approx(sv.sum() / sv[0], rel=REL)
    # and it differs from dimscope's default (centered, eigenvalue PR)
    assert dimscope.measure(torch.tensor(X))["participation_ratio"] != pytest.approx(got["participation_ratio"], rel=1e-2)
    s = spectrum(torch.tensor(X), center=False)
    assert ndt_participation_ratio(s) == pytest.approx(got["participation_ratio"])


def test_matches_ndtracker_package_if_installed():
    est = pytest.importorskip("ndt.core.estimators")
    X = torch.randn(64, 40, generator=torch.Generator().manual_seed(0)) + 0.5
    got = measure_ndt(X)
    assert got["stable_rank"] == pytest.approx(est.stable_rank(X), rel=1e-4)
    assert got["participation_ratio"] == pytest.approx(est.participation_ratio(X), rel=1e-4)
    assert got["cumulative_90"] == est.cumulative_energy_90(X)
    assert got["nuclear_norm_ratio"] == pytest.approx(est.nuclear_norm_ratio(X), rel=1e-4)


def test_weight_spectrum_is_squared_singular_values():
    W = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = weight_spectrum(W)
    np.testing.assert_allclose(s.values, torch.linalg.svdvals(W).numpy() ** 2, rtol=1e-10)
    conv = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert weight_spectrum(conv).n_features == 27


def test_float32_input_is_upcast():
    X32 = torch.randn(100, 10, generator=torch.Generator().manual_seed(0)) * 1e3 + 1e4
    s32 = spectrum(X32)
    s64 = spectrum(X32.double())
    np.testing.assert_allclose(s32.values, s64.values, rtol=1e-12)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        spectrum(torch.randn(1, 5))
    with pytest.raises(ValueError, match="2-D"):
        spectrum(torch.randn(5))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        spectrum([[1.0, 2.0]])
    with pytest.raises(NonFiniteError):
        spectrum(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown metric 'stable_rnk'.*Closest: stable_rank"):
        dimscope.measure(torch.randn(5, 3), metrics=["stable_rnk"])


def test_spectrum_from_gram_matches_direct():
    X = torch.randn(50, 6, dtype=torch.float64)
    Xc = X - X.mean(0)
    s = spectrum_from_gram(Xc.T @ Xc, 50, 6, centered=True)
    np.testing.assert_allclose(s.values, spectrum(X).values, rtol=1e-10)


def test_rankme_and_effective_rank_isotropic_equal_dimension():
    s = Spectrum(np.ones(16), 100, 16)
    assert effective_rank(s) == pytest.approx(16.0, rel=REL)
    assert rankme(s) == pytest.approx(16.0, rel=1e-4)  # the +1e-7 moves it slightly
    assert nuclear_ratio(s) == pytest.approx(16.0)


# --- round-off, scale and input edge cases (from an independent numerical review) -------------------


def test_a_collapsed_float64_layer_has_rank_zero_on_every_path():
    """Identical float64 rows: the exact covariance is 0, and centering's round-off must not be read as rank 1."""
    rng = np.random.default_rng(3)
    X = np.tile(rng.standard_normal((1, 40)) * 3.7, (64, 1))
    for values in (dimscope.measure(X), dimscope.measure(X.T.copy().T)):  # n > d and a Fortran-ordered copy
        assert all(v == 0.0 for v in values.values()), values
    assert dimscope.spectrum(X[:8, :]).values.max() == 0.0  # n < d: the n x n Gram
    t = torch.from_numpy(X)
    full, mom = batch_spectra([(t, True, True), (t, True, False)])
    assert full.values.max() == 0.0 and (mom.trace, mom.top, mom.sum_sq) == (0.0, 0.0, 0.0)
    # a real variance far below the mean's size is kept (1e-6 relative standard deviation)
    Y = X + 1e-6 * rng.standard_normal(X.shape)
    assert dimscope.measure(Y)["eps_rank"] == pytest.approx(dimscope.measure(Y - X.mean(0))["eps_rank"], abs=1)
    assert dimscope.stable_rank(dimscope.spectrum(Y)) > 1.0
    # a column with a huge offset does not hide a tiny but resolvable variance in another one
    Z = np.column_stack([1.7e9 + rng.uniform(0, 2000, 1000), rng.normal(0, 1e-4, 1000)])
    kept = dimscope.spectrum(Z).values
    assert kept[1] == pytest.approx(dimscope.spectrum(Z - Z.mean(0)).values[1], rel=1e-3) and kept[1] > 5e-9
    # many tiny variances under a large common offset: every path agrees with the data centered first
    W = 1e9 + np.sqrt(np.r_[1e-8, np.full(49, 1e-9)]) * rng.standard_normal((1000, 50))
    want = dimscope.measure(W - W.mean(0))
    got = dimscope.measure(W)
    assert got["eps_rank"] == want["eps_rank"] == 50
    assert got["participation_ratio"] == pytest.approx(want["participation_ratio"], rel=1e-6)
    full, mom = batch_spectra([(torch.from_numpy(W), True, True), (torch.from_numpy(W), True, False)])
    assert mom.trace ** 2 / mom.sum_sq == pytest.approx(dimscope.participation_ratio(full), rel=1e-6)
    assert dimscope.participation_ratio(full) == pytest.approx(want["participation_ratio"], rel=1e-6)


@pytest.mark.parametrize("scale", [1e-150, 1e-80, 1e80, 1e150])
def test_participation_ratio_is_scale_free_on_both_paths(scale):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 50))
    want = dimscope.measure(X)["participation_ratio"]
    assert dimscope.measure(X * scale)["participation_ratio"] == pytest.approx(want, rel=1e-9)
    (m,) = batch_spectra([(torch.from_numpy(X * scale), True, False)])
    pr = moment_metrics(np.array([m.trace]), np.array([m.top]), np.array([m.sum_sq]), ["participation_ratio"],
                        sum_sq_rel=np.array([m.sum_sq_rel]))["participation_ratio"][0]
    assert pr == pytest.approx(want, rel=1e-9)


def test_inputs_spectrum_reads_or_rejects_clearly():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 7))
    # numpy views with negative strides (np.flip, X[::-1]) read like their copies
    assert dimscope.measure(X[::-1]) == pytest.approx(dimscope.measure(X[::-1].copy()), rel=1e-12)
    assert dimscope.measure(np.flip(X, 1)) == pytest.approx(dimscope.measure(X), rel=1e-12)
    # finite values whose squares overflow float64: an error that says so, not "NaN or Inf" or a LAPACK failure
    Y = X.copy()
    Y[0, 0] = 1e200
    with pytest.raises(NonFiniteError, match="too large to square"):
        dimscope.spectrum(Y)
    (err,) = batch_spectra([(torch.from_numpy(Y), True, True)])
    assert isinstance(err, NonFiniteError) and "too large" in str(err)
    with pytest.raises(TypeError, match="The 'X' parameter of spectrum must be real. Got dtype torch.complex128"):
        dimscope.spectrum(torch.ones(4, 3, dtype=torch.complex128))
    # one sample: uncentered it has a spectrum (‖x‖²), centered it has none
    assert dimscope.spectrum(np.array([[1.0, 2.0, 2.0]]), center=False).values == pytest.approx([9.0])
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        dimscope.spectrum(np.array([[1.0, 2.0, 2.0]]))


def test_spectrum_from_gram_rejects_what_is_not_a_gram_matrix():
    with pytest.raises(ValueError, match=r"size n_samples \(3\) or n_features \(2\). Got shape \(5, 5\)"):
        spectrum_from_gram(np.eye(5), 3, 2)
    with pytest.raises(ValueError, match="must be symmetric"):
        spectrum_from_gram(np.array([[1.0, 2.0], [0.0, 1.0]]), 2, 2, centered=False)
    # a float32-accumulated Gram matrix, symmetric to round-off, is accepted
    X = torch.randn(50, 6)
    G = (X.T @ X).double() + 1e-9 * torch.randn(6, 6, dtype=torch.float64)
    assert len(spectrum_from_gram(G, 50, 6, centered=False).values) == 6


@pytest.mark.parametrize("center", [True, False])
def test_values_too_small_to_square_are_refused_not_measured_as_collapse(center):
    """Entries under about 1e-154 square into float64's subnormal range or to 0: every metric would
    read 0, a false collapse. They raise NonFiniteError (the Tracker records NaN with a warning), as
    values too large to square do; 1e-140 still measures exactly as 1 does; exact zeros, and rows
    identical before centering, stay rank 0."""
    X = np.random.default_rng(0).standard_normal((20, 6))
    want = dimscope.measure(X) if center else dimscope.measure(X, center=False)
    got = spectrum(torch.tensor(X * 1e-140), center=center)
    assert dimscope.stable_rank(got) == pytest.approx(want["stable_rank"], rel=1e-12)
    for scale in (1e-162, 1e-170, 1e-200):
        with pytest.raises(NonFiniteError, match="too small to square in float64"):
            spectrum(X * scale, center=center)
    with pytest.raises(NonFiniteError, match="too small to square in float64"):
        weight_spectrum(torch.tensor(X * 1e-170))
    tasks = [(torch.tensor(X * 1e-170), center, True), (torch.tensor(X), center, False), (torch.tensor(X * 1e-170), center, False),
             (torch.zeros(20, 6, dtype=torch.float64), center, True), (torch.tensor(X), None, True)]
    out = batch_spectra(tasks)
    assert isinstance(out[0], NonFiniteError) and isinstance(out[2], NonFiniteError) and "too small" in str(out[0])
    assert not isinstance(out[1], BaseException) and not isinstance(out[4], BaseException)
    assert out[3].values.sum() == 0.0
    assert dimscope.stable_rank(spectrum(np.ones((5, 3)) * 1e-170, center=True)) == 0.0  # identical rows center to 0
    # small but normal squares measure exactly: down to 1e-154, a sparse matrix of two tiny values, and
    # near-constant rows at 1e-140 whose deviations are 1e-153
    for scale in (1e-150, 1e-154):
        assert dimscope.participation_ratio(spectrum(X * scale, center=center)) == pytest.approx(
            dimscope.participation_ratio(spectrum(X, center=center)), rel=1e-9)
    S = np.zeros((20, 30))
    S[3, 4], S[7, 9] = 1e-150, 2e-150
    assert dimscope.participation_ratio(spectrum(S, center=center)) == pytest.approx(
        dimscope.participation_ratio(spectrum(S * 1e150, center=center)), rel=1e-9)
    X0 = 1 + 1e-13 * X
    assert dimscope.participation_ratio(spectrum(X0 * 2.0**-465, center=True)) == pytest.approx(
        dimscope.participation_ratio(spectrum(X0, center=True)), rel=1e-6)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda X: spectrum(X, center="no"), TypeError, "The 'center' parameter of spectrum must be True or False. Got 'no' instead."),
        (lambda X: dimscope.measure(X, center=None), TypeError, "The 'center' parameter of spectrum must be True or False. Got None"),
        (lambda X: weight_spectrum(torch.randn(4, 3, dtype=torch.cfloat)), TypeError, "The 'W' parameter of weight_spectrum must be real"),
        (lambda X: weight_spectrum("abc"), TypeError, "The 'W' parameter of weight_spectrum must be a torch.Tensor, numpy array or nested list. Got str."),
        (lambda X: dimscope.eps_rank(spectrum(X), eps=float("inf")), ValueError, "The 'eps' parameter of eps_rank must be a float >= 0.0 and < 1.0. Got inf"),
        (lambda X: dimscope.eps_rank(spectrum(X), eps=1), ValueError, "The 'eps' parameter of eps_rank must be a float >= 0.0 and < 1.0. Got 1"),
        (lambda X: dimscope.eps_rank(spectrum(X), eps=float("inf"), relative=False), ValueError, "must be a float >= 0.0 and < inf. Got inf"),
        (lambda X: spectrum(X).top(0), ValueError, "The 'k' parameter of Spectrum.top must be an int >= 1. Got 0 instead."),
        (lambda X: spectrum(X).top(2.5), TypeError, "The 'k' parameter of Spectrum.top must be an int >= 1. Got 2.5 instead."),
        (lambda X: dimscope.measure(X, metrics=5), TypeError, "The 'metrics' parameter must be a metric name, a list of names, or a dict"),
        (lambda X: dimscope.measure(X, metrics={"eps_rank": {"epsilon": 1}}), ValueError, "The 'metrics' parameter of measure gives eps_rank an unknown parameter 'epsilon'"),
    ],
)
def test_bad_arguments_name_the_parameter(call, exc, msg):
    X = np.random.default_rng(0).standard_normal((20, 6))
    with pytest.raises(exc, match=re.escape(msg)):
        call(X)


def test_weight_spectrum_takes_a_negative_stride_array():
    W = np.random.default_rng(1).standard_normal((5, 8))
    assert weight_spectrum(W[::-1]).values == pytest.approx(weight_spectrum(W).values, rel=1e-12)
    assert dimscope.eps_rank(spectrum(W), eps=0.0) == 4.0  # ε = 0: the numerical rank (5 centered rows)
