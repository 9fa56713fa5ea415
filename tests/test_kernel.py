"""The Tracker's measurement kernel: batched spectra, vectorised metrics, the moment path (tr C,
tr C², λ_1 by Lanczos) and ``spectra_every``, each against the one-at-a-time definitions."""

import numpy as np
import pytest
import torch
from torch import nn

import dimscope
from dimscope.metrics import compute_metrics, compute_metrics_batch, moment_metrics
from dimscope.spectrum import (
    Moments,
    NonFiniteError,
    Spectrum,
    Workspace,
    batch_spectra,
    spectrum,
    top_eigenvalue,
    weight_spectrum,
)


def psd_with(eigs: np.ndarray, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with exactly the eigenvalues ``eigs`` (a random rotation)."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return (Q * eigs) @ Q.T


def test_vectorised_metrics_equal_the_scalar_ones():
    rng = np.random.default_rng(0)
    V = np.sort(rng.exponential(size=(6, 40)), axis=1)[:, ::-1].copy()
    V[1, 5:] = 0.0  # rank 5
    V[2] = 0.0  # all zeros: every metric 0
    V[3, 1:] = 0.0  # rank 1
    traces = V.sum(1)
    traces[4] *= 1.5  # a truncated spectrum: its trace covers eigenvalues not held
    params = {"stable_rank": {}, "participation_ratio": {}, "effective_rank": {}, "rankme": {}, "nuclear_ratio": {},
              "eps_rank": {"eps": 0.05, "relative": False}, "energy_rank": {"q": 0.5}}
    got = compute_metrics_batch(V, traces, params)
    for i in range(len(V)):
        one = compute_metrics(Spectrum(V[i], 100, 40, True, traces[i]), params)
        for name, v in one.items():
            assert got[name][i] == pytest.approx(v, rel=1e-12, abs=1e-12), (name, i)
    assert all(got[name][2] == 0.0 for name in params)


def test_moment_metrics_equal_the_spectrum_ones():
    ev = np.array([5.0, 3.0, 1.0, 0.5, 0.0])
    s = Spectrum(ev, 50, 5, True)
    got = moment_metrics(np.array([ev.sum()]), np.array([ev[0]]), np.array([np.dot(ev, ev)]), None)
    assert got["stable_rank"][0] == pytest.approx(dimscope.metrics.stable_rank(s), rel=1e-14)
    assert got["participation_ratio"][0] == pytest.approx(dimscope.metrics.participation_ratio(s), rel=1e-14)
    assert set(got) == {"stable_rank", "participation_ratio"}


@pytest.mark.parametrize(
    "eigs",
    [
        np.r_[10.0, np.linspace(1.0, 0.1, 199)],  # a clear gap
        np.r_[2.0, 2.0, np.linspace(1.9, 0.0, 198)],  # a degenerate top eigenvalue
        np.linspace(1.0, 0.999, 200),  # an isotropic cluster: the hardest case for Lanczos
        np.r_[7.0, np.zeros(299)],  # rank one
    ],
    ids=["gap", "degenerate", "cluster", "rank1"],
)
def test_top_eigenvalue_equals_the_planted_one(eigs):
    G = psd_with(eigs)
    top, vec = top_eigenvalue(G)
    assert top == pytest.approx(eigs.max(), rel=1e-10)
    if vec is not None:  # a unit vector with Rayleigh quotient λ_1
        assert np.linalg.norm(vec) == pytest.approx(1.0, rel=1e-8)
        assert vec @ G @ vec == pytest.approx(eigs.max(), rel=1e-9)
    # from a warm start (the top vector of a nearby matrix) the answer is the same
    near = G + 1e-3 * psd_with(np.linspace(1, 0, len(eigs)), seed=1)
    _, v_near = top_eigenvalue(near)
    assert top_eigenvalue(G, v_near)[0] == pytest.approx(eigs.max(), rel=1e-10)


def test_top_eigenvalue_of_zero_and_small_matrices():
    assert top_eigenvalue(np.zeros((200, 200)))[0] == 0.0
    G = psd_with(np.array([3.0, 2.0, 1.0]))
    assert top_eigenvalue(G)[0] == pytest.approx(3.0, rel=1e-12)


def test_batch_spectra_equal_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    wide = torch.relu(torch.randn(40, 300, generator=g))  # n < d: the n x n side
    tall = torch.randn(300, 30, generator=g, dtype=torch.float64) + 3.0  # n > d, float64, far from centered
    weight = torch.randn(20, 8, 3, generator=g)  # reshaped to (20, 24)
    tall_copy = tall.clone()
    tasks = [(wide, True, True), (wide, False, True), (tall, True, True), (tall, False, True), (weight, None, True),
             (wide.clone(), True, True)]
    got = batch_spectra(tasks, threads=2)
    want = [spectrum(wide), spectrum(wide, center=False), spectrum(tall), spectrum(tall, center=False),
            weight_spectrum(weight), spectrum(wide)]
    for s, w in zip(got, want):
        assert isinstance(s, Spectrum)
        assert (s.n_samples, s.n_features, s.centered, len(s.values)) == (w.n_samples, w.n_features, w.centered, len(w.values))
        np.testing.assert_allclose(s.values, w.values, rtol=1e-9, atol=1e-12 * w.values[0])
    assert torch.equal(tall, tall_copy)  # the caller's float64 tensor is not centered in place


def test_batch_spectra_with_a_workspace_reuse_buffers_without_mixing_results():
    """Buffers are reused from call to call, but two stacks of one Gram size in one call (features
    512 x 64 and a weight 64 x 200: both 64 x 64) get their own, and results of an earlier call are
    not changed by a later one."""
    ws = Workspace()
    g = torch.Generator().manual_seed(1)
    earlier: list[tuple[list, list]] = []
    buffers = []
    for call in range(3):
        feats = [torch.randn(512, 64, generator=g) * (1 + k) for k in range(3)]
        weight = torch.randn(64, 200, generator=g)
        bad = torch.randn(512, 64, generator=g)
        bad[3, 5] = float("nan")
        tasks = [(f, True, True) for f in feats] + [(weight, None, True), (feats[0], True, False), (bad, True, True)]
        got = batch_spectra(tasks, threads=2, workspace=ws)
        want = [spectrum(f) for f in feats] + [weight_spectrum(weight)]
        for s, w in zip(got, want):
            np.testing.assert_allclose(s.values, w.values, rtol=1e-9, atol=1e-12 * w.values[0])
        assert got[4].trace == pytest.approx(want[0].trace, rel=1e-12)
        assert got[4].top == pytest.approx(want[0].values[0], rel=1e-10)
        assert isinstance(got[5], NonFiniteError)
        earlier.append(([s.values.copy() for s in got[:4]], got[:4]))
        buffers.append({k: b.data_ptr() for k, b in ws._bufs.items()})
    for copies, spectra in earlier:  # a later call wrote into the same buffers: these are unchanged
        for c, s in zip(copies, spectra):
            np.testing.assert_array_equal(c, s.values)
    assert buffers[0] and buffers[0] == buffers[1] == buffers[2]  # allocated once, then reused
    small = Workspace(max_bytes=1024)  # nothing fits: every buffer is allocated per call
    got = batch_spectra([(feats[0], True, True)], workspace=small)
    np.testing.assert_allclose(got[0].values, spectrum(feats[0]).values, rtol=1e-9)
    assert small.nbytes() == 0


def test_batch_spectra_moments_equal_the_spectrum():
    g = torch.Generator().manual_seed(1)
    X = torch.relu(torch.randn(400, 200, generator=g) @ torch.randn(200, 200, generator=g) / 14)
    W = torch.randn(180, 256, generator=g)
    starts: dict = {}
    got = batch_spectra([(X, True, False), (W, None, False), (X[:50], True, False)], starts=starts, slots=["x", "w", "small"])
    for m, s in zip(got, [spectrum(X), weight_spectrum(W), spectrum(X[:50])]):
        assert isinstance(m, Moments)
        assert m.trace == pytest.approx(s.values.sum(), rel=1e-10)
        assert m.sum_sq == pytest.approx(np.dot(s.values, s.values), rel=1e-10)
        assert m.top == pytest.approx(s.values[0], rel=1e-10)
        assert (m.n_samples, m.n_features, m.ceiling) == (s.n_samples, s.n_features, s.ceiling)
    assert set(starts) == {"x", "w"}  # Lanczos ran on the two large Gram matrices and left warm starts


def test_batch_spectra_nan_matrix_fails_alone():
    X = torch.randn(30, 10)
    bad = X.clone()
    bad[3, 4] = float("nan")
    inf = X.clone()
    inf[0, 0] = float("inf")
    got = batch_spectra([(X, True, True), (bad, True, True), (inf, True, False), (X, True, False)])
    assert isinstance(got[0], Spectrum) and isinstance(got[3], Moments)
    assert isinstance(got[1], NonFiniteError) and isinstance(got[2], NonFiniteError)


def wide_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 200), nn.ReLU(), nn.Linear(200, 10))


def train_tracked(tracker, model, steps=13):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 12, generator=g)), torch.randint(0, 10, (32,), generator=g)).backward()
        opt.step()
        tracker.step(step, loss=0.0)


@pytest.mark.parametrize("background", [False, "batched"])
def test_spectra_every_records_moment_metrics_between_whole_spectra(tmp_path, background):
    probe = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, kw in {"full": {}, "sparse": {"spectra_every": 6}}.items():
        model = wide_mlp()
        with dimscope.Tracker(model, probe=probe, every=2, layers=["0", "2"], run=tmp_path / name, background=background,
                              weight_every=2, **kw) as tr:
            train_tracked(tr, model)
        runs[name] = dimscope.open_run(tmp_path / name)
    full, sparse = runs["full"], runs["sparse"]
    assert sparse.manifest["spectra_every"] == 6
    for layer in ("0", "2"):
        assert list(sparse.metric("effective_rank", layer).index) == [0, 6, 12]
        assert list(sparse.spectra(layer).index) == [0, 6, 12]
        for metric in ("stable_rank", "participation_ratio"):
            a, b = sparse.metric(metric, layer), full.metric(metric, layer)
            assert list(a.index) == list(range(0, 13, 2))
            np.testing.assert_allclose(a.values, b.values, rtol=1e-9)
    w = sparse.scalars()
    w = w[(w.space == "weight") & (w.layer == "0")]
    assert sorted(w[w.metric == "stable_rank"].step) == list(range(0, 13, 2))
    assert sorted(w[w.metric == "rankme"].step) == [0, 6, 12]


def test_moment_metrics_only_never_eigendecompose_a_wide_layer(tmp_path, monkeypatch):
    import sys

    kernel = sys.modules["dimscope.spectrum"]
    sizes = []
    real = kernel._eigvalsh_stack
    monkeypatch.setattr(kernel, "_eigvalsh_stack", lambda G, threads: sizes.append(G.shape[-1]) or real(G, threads))
    probe = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    model = wide_mlp()
    with dimscope.Tracker(model, probe=probe, every=2, layers=["0", "2"], run=tmp_path / "m", spectra=None,
                          metrics=["stable_rank", "participation_ratio"]) as tr:
        train_tracked(tr, model)
    assert sizes == []  # no whole spectrum was computed
    run = dimscope.open_run(tmp_path / "m")
    assert set(run.scalars().query("space == 'activation'").metric) == {"stable_rank", "participation_ratio"}
    assert len(run.metric("stable_rank", "0")) == 7
    X = dimscope.tracker.probe_forward(model, probe, ["0"])["0"]
    assert run.metric("stable_rank", "0").iloc[-1] == pytest.approx(dimscope.metrics.stable_rank(spectrum(X)), rel=1e-9)


def test_spectra_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match="'spectra_every' parameter of Tracker must be an int >= 1. Got 0"):
        dimscope.Tracker(wide_mlp(), probe=torch.randn(8, 12), spectra_every=0)


def test_a_forced_measurement_is_a_whole_one():
    model = wide_mlp()
    with dimscope.Tracker(model, probe=torch.randn(64, 12), every=5, layers=["0"], background=False) as tr:
        vals = tr.step(7, force=True)
    assert {m for (layer, m) in vals if layer == "0"} >= {"effective_rank", "rankme", "eps_rank"}


def test_an_empty_layer_output_fails_alone_in_a_flush(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 8)
            self.e = nn.Linear(12, 8)

        def forward(self, x):
            return self.a(x) + self.e(x[:0]).sum()  # the "expert" e sees no rows

    model = TwoHeads()
    with pytest.warns(RuntimeWarning, match="layer 'e' could not be measured at step 0") as w:
        with dimscope.Tracker(model, probe=torch.randn(32, 12), every=1, layers=["a", "e"], run=tmp_path / "e",
                              background="batched", weight_metrics=False) as tr:
            for step in range(3):
                tr.step(step, loss=1.0)
    assert not any("measurement failed" in str(x.message) for x in w)
    run = dimscope.open_run(tmp_path / "e")
    assert list(run.metric("stable_rank", "a").index) == [0, 1, 2]
    assert list(run.training("loss").index) == [0, 1, 2]
    # the only layer fails: the measurements are skipped, the losses are kept
    with pytest.warns(RuntimeWarning, match="a measurement failed and was skipped"):
        with dimscope.Tracker(model, probe=torch.randn(32, 12), every=2, layers=["e"], run=tmp_path / "only",
                              weight_metrics=False) as tr:
            for step in range(6):
                tr.step(step, loss=float(step))
    assert list(dimscope.open_run(tmp_path / "only").training("loss").index) == list(range(6))


def test_a_failing_lanczos_fails_its_layer_only(tmp_path, monkeypatch):
    import sys

    kernel = sys.modules["dimscope.spectrum"]

    def broken(*a, **k):
        raise np.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(kernel, "_lanczos_top", broken)
    probe = torch.randn(300, 12, generator=torch.Generator().manual_seed(3))
    model = wide_mlp()
    with pytest.warns(RuntimeWarning, match="layer '0' could not be measured"):
        with dimscope.Tracker(model, probe=probe, every=1, layers=["0", "2"], run=tmp_path / "l", spectra_every=5,
                              weight_metrics=False) as tr:
            train_tracked(tr, model, steps=10)
    run = dimscope.open_run(tmp_path / "l")
    assert list(run.metric("stable_rank", "2").index) == list(range(10))  # layer 2 (10 wide) needs no Lanczos
    assert list(run.metric("stable_rank", "0").index) == [0, 5]  # layer 0's whole spectra only
    assert list(run.training("loss").index) == list(range(10))


def test_nan_after_a_failure_still_warns(tmp_path):
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 8)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.a(x)
            if self.calls == 1:
                return out[:0]  # first measurement: no rows
            return out * float("nan") if self.calls == 2 else out

    model = nn.Sequential(Flaky())
    with pytest.warns(RuntimeWarning) as w:
        with dimscope.Tracker(model, probe=torch.randn(16, 12), every=1, layers=["0"], run=tmp_path / "f",
                              weight_metrics=False, background=False) as tr:
            for step in range(3):
                tr.step(step, loss=1.0)
    msgs = [str(x.message) for x in w]
    assert any("NaN or Inf activations (or values too large or too small for float64) in layer '0' at step 1" in m for m in msgs)


def test_metrics_of_a_nan_spectrum_are_nan():
    s = Spectrum(np.array([np.nan, 1.0]), 10, 2, True)
    for name in ("stable_rank", "participation_ratio", "effective_rank", "rankme", "nuclear_ratio", "eps_rank", "energy_rank"):
        assert np.isnan(compute_metrics(s, [name])[name]), name


def test_lanczos_warm_start_from_a_direction_that_is_no_longer_the_top_one():
    # two blocks: A fixed at top eigenvalue 1.0, B's top rises past it; the previous top vector lies in A
    rng = np.random.default_rng(0)

    def block(top):
        U, _ = np.linalg.qr(rng.standard_normal((100, 100)))
        return (U * np.r_[top, np.linspace(0.5, 0.01, 99)]) @ U.T

    A = block(1.0)
    G0 = np.zeros((200, 200))
    G0[:100, :100], G0[100:, 100:] = A, block(0.99)
    _, v = top_eigenvalue(G0)
    for top_b in (1.001, 1.01, 1.05):
        G = G0.copy()
        G[100:, 100:] = block(top_b)
        got, v_new = top_eigenvalue(G, v)
        assert got == pytest.approx(top_b, rel=1e-10)
        v = v_new if v_new is not None else v


def test_lanczos_is_not_trapped_by_a_start_that_is_another_eigenvector():
    G = np.diag(np.linspace(1.0, 2.0, 200))
    G[0, 0] = 1.9
    start = np.zeros(200)
    start[0] = 1.0
    assert top_eigenvalue(G, start)[0] == pytest.approx(2.0, rel=1e-10)


def test_overlapping_blas_limits_on_two_threads_restore_the_original_setting():
    """The BLAS thread count is process-wide: a limit taken on the measurement thread and one taken on
    the training thread, ending in either order, must leave the original setting behind."""
    import threading

    from threadpoolctl import threadpool_info

    from dimscope.spectrum import _one_blas_thread

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def other():
        with _one_blas_thread():
            inside.set()
            release.wait(10)
        done.set()

    with _one_blas_thread():  # the training thread's limit, taken first
        t = threading.Thread(target=other)
        t.start()
        inside.wait(10)
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {1}  # the other thread still measures: its limit holds
    release.set()
    done.wait(10)
    t.join()
    assert blas_threads() == before


def test_the_shared_blas_limit_leaves_torchs_per_thread_counts_and_other_threads_limits_alone():
    """Only BLAS is limited (torch's OpenMP count is per thread: a limit closed on another thread must
    not carry the opener's count over), and a limit another thread holds while the shared one is
    taken is not left in force after both end."""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from dimscope.spectrum import _one_blas_thread

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before_torch, before_blas = torch.get_num_threads(), blas_threads()
    try:
        torch.set_num_threads(2)
        opened, main_in, closed = threading.Event(), threading.Event(), threading.Event()

        def worker():  # one torch thread, opens the shared limit first; main closes it last
            torch.set_num_threads(1)
            with _one_blas_thread():
                opened.set()
                main_in.wait(10)
            closed.set()

        t = threading.Thread(target=worker)
        t.start()
        opened.wait(10)
        with _one_blas_thread():
            main_in.set()
            closed.wait(10)
        t.join()
        assert torch.get_num_threads() == 2

        inside, release = threading.Event(), threading.Event()

        def measuring():
            with _one_blas_thread():
                inside.set()
                release.wait(10)

        t = threading.Thread(target=measuring)
        with threadpool_limits(limits=1, user_api="blas"):  # e.g. scikit-learn's, on the training thread
            t.start()
            inside.wait(10)
        release.set()
        t.join()
        assert blas_threads() == before_blas
    finally:
        torch.set_num_threads(before_torch)
