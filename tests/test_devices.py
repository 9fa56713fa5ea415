"""The accelerator paths: the same numbers on CUDA as on the CPU.

Each test runs on the CPU and, where a GPU is present, on CUDA. References are computed on the CPU
in float64 by a separate route (numpy's eigvalsh, a CPU copy of the model, the CPU run), so the CPU
case checks the reference and the CUDA case checks the device path against it. On a machine without
CUDA the CUDA cases are skipped (CI has none; the closing notes record the runs on a GPU).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dimscope
from dimscope.capture import count_hooks, to_features
from dimscope.metrics import compute_metrics
from dimscope.spectrum import batch_spectra

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
CONTINUOUS = ["stable_rank", "participation_ratio", "effective_rank", "rankme", "nuclear_ratio"]


def numpy_spectrum(X: torch.Tensor, center: bool) -> np.ndarray:
    """Covariance eigenvalues, descending, by numpy on the d x d or n x n Gram matrix (float64)."""
    A = X.detach().cpu().double().numpy()
    if center:
        A = A - A.mean(0)
    n, d = A.shape
    G = A @ A.T if n <= d else A.T @ A
    ev = np.sort(np.linalg.eigvalsh(G))[::-1] / ((n - 1) if center else n)
    m = min(n - 1, d) if center else min(n, d)
    return np.clip(ev[:m], 0.0, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(50, 120), (300, 40)])  # n < d (n x n Gram) and n > d (d x d Gram)
@pytest.mark.parametrize("center", [True, False])
def test_spectrum_on_device_equals_numpy(device: str, shape: tuple[int, int], center: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, d = shape
    scales = torch.logspace(0, -3, d)
    X = (torch.randn(n, d, generator=g) * scales + 4.0).to(device)  # float32, a large mean
    s = dimscope.spectrum(X, center=center)
    want = numpy_spectrum(X, center)
    assert isinstance(s.values, np.ndarray) and s.values.dtype == np.float64
    assert (s.n_samples, s.n_features, s.centered) == (n, d, center)
    np.testing.assert_allclose(s.values, want, rtol=0, atol=1e-9 * want[0])
    np.testing.assert_allclose(s.values[:10], want[:10], rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_spectra_and_weight_spectrum_on_device(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(64, 32, generator=g).to(device) for _ in range(3)]
    W = torch.randn(20, 7, 3, generator=g).to(device)  # a conv-like weight: reshaped to (20, 21)
    out = batch_spectra([(f, True, True) for f in feats] + [(W, None, True)])
    for f, s in zip(feats, out[:3]):
        np.testing.assert_allclose(s.values, numpy_spectrum(f, True), rtol=1e-9, atol=1e-12)
    sv = np.linalg.svd(W.cpu().double().reshape(20, -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(out[3].values, sv**2, rtol=1e-9)
    np.testing.assert_allclose(dimscope.weight_spectrum(W).values, sv**2, rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compares the CUDA rows with the CPU rows")
def test_row_cap_picks_the_same_rows_on_cuda() -> None:
    t = torch.randn(16, 50, 8, generator=torch.Generator().manual_seed(3))  # (B, T, D): 800 rows, capped at 100
    cpu = to_features(t, max_rows=100, seed=5)
    gpu = to_features(t.cuda(), max_rows=100, seed=5)
    assert gpu.device.type == "cuda" and gpu.shape == (100, 8)
    assert torch.equal(gpu.cpu(), cpu)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(inplace=True), nn.Linear(24, 3))


def _reference(model: nn.Module, x: torch.Tensor, layers: list[str], metrics: list[str]) -> dict[tuple[str, str], float]:
    """The values by hand on the CPU: float64 numpy spectra of a CPU copy's layer outputs, and its weights."""
    cpu = copy.deepcopy(model).cpu().eval()
    outs: dict[str, torch.Tensor] = {}
    hooks = [cpu.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach().clone())) for n in layers]
    with torch.no_grad():
        cpu(x.cpu())
    for h in hooks:
        h.remove()
    ref = {}
    for n in layers:
        s = dimscope.Spectrum(numpy_spectrum(outs[n], True), x.shape[0], outs[n].shape[1], centered=True)
        ref.update({(n, m): v for m, v in compute_metrics(s, metrics).items()})
        sw = np.linalg.svd(cpu.get_submodule(n).weight.detach().double().numpy(), compute_uv=False) ** 2
        w = dimscope.Spectrum(sw, *cpu.get_submodule(n).weight.shape, centered=False)
        ref.update({(n, "weight/" + m): v for m, v in compute_metrics(w, metrics).items()})
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["probe", "batch"])
@pytest.mark.parametrize("background", [False, True, "batched"])
def test_tracker_on_device_matches_a_cpu_reference(device: str, mode: str, background: bool | str, tmp_path) -> None:
    layers, every, metrics = ["0", "2", "4"], 3, CONTINUOUS
    model = _mlp().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    probe = torch.randn(70, 12, generator=g)  # on the CPU: the tracker moves it to the model
    batches = [(torch.randn(48, 12, generator=g).to(device), torch.randint(0, 3, (48,), generator=g).to(device)) for _ in range(8)]
    refs: dict[int, dict[tuple[str, str], float]] = {}
    losses: list[float] = []
    hooks_before = count_hooks(model)
    tracker = dimscope.Tracker(model, probe=probe if mode == "probe" else None, every=every, layers=layers, mode=mode,
                               run=str(tmp_path / "run"), metrics=metrics, background=background, max_rows=None,
                               weight_every=every)
    model.train()
    for step, (x, y) in enumerate(batches):
        if mode == "batch" and step % every == 0:  # batch mode: this batch under the weights before the update
            ref = _reference(model, x, layers, metrics)
            refs[step] = {k: v for k, v in ref.items() if not k[1].startswith("weight/")}
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            ref = _reference(model, probe if mode == "probe" else x, layers, metrics)
            refs[step] = {**refs.get(step, {}), **{k: v for k, v in ref.items() if mode == "probe" or k[1].startswith("weight/")}}
        tracker.step(step, loss=loss.detach())  # on CUDA: copied there and read at the next write
        losses.append(loss.item())
        assert model.training and torch.is_grad_enabled()
    tracker.close()
    assert dimscope.open_run(tmp_path / "run").training("loss").tolist() == losses
    assert count_hooks(model) == hooks_before
    assert all(p.device.type == device for p in model.parameters())
    df = dimscope.open_run(tmp_path / "run").scalars()
    got = {}
    for r in df.itertuples(index=False):
        if r.space == "activation" and r.convention == f"{mode}/centered":
            got[(int(r.step), r.layer, r.metric)] = float(r.value)
        elif r.space == "weight":
            got[(int(r.step), r.layer, "weight/" + r.metric)] = float(r.value)
    assert sorted({k[0] for k in got}) == [0, 3, 6]
    n = 0
    for step, ref in refs.items():
        for (layer, metric), v in ref.items():
            # float32 forwards on the two devices differ by round-off; the spectra are float64 on both
            assert got[(step, layer, metric)] == pytest.approx(v, rel=2e-5), (step, layer, metric)
            n += 1
    assert n == 3 * 3 * 2 * len(metrics)


def _jacobian_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compares the CUDA run with the CPU run")
@pytest.mark.parametrize("method", ["mlp", "generic"])
@pytest.mark.parametrize("optimizer,loss,dtype", [("sgd", "cross_entropy", torch.float64), ("adam", "cross_entropy", torch.float64),
                                                  ("adam", "mse", torch.float32)])
def test_training_jacobian_on_cuda_equals_the_cpu_run(method: str, optimizer: str, loss: str, dtype: torch.dtype) -> None:
    from dimscope.jacobian import training_jacobian

    kw = dict(optimizer=optimizer, lr=0.05, batch_size=8, epochs=2, dtype=dtype, method=method, shuffle=True, loss=loss)
    model, X, y = _jacobian_problem()
    if loss == "mse":  # float targets: the branch that casts y to the run's dtype
        y = torch.nn.functional.one_hot(y, 3).double() * 0.8 + 0.1
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    ref = training_jacobian(model, X, y, **kw)
    gpu_model = copy.deepcopy(model).cuda()
    tj = training_jacobian(gpu_model, X, y, **kw)  # data on the CPU: moved to the model's device
    assert tj.J.device.type == "cpu" and tj.theta_final.device.type == "cpu" and tj.J.dtype == dtype
    assert tj.method == ref.method
    torch.testing.assert_close(tj.J, ref.J, **tol)
    torch.testing.assert_close(tj.theta_final, ref.theta_final, **tol)
    np.testing.assert_allclose(tj.singular_values.double().numpy(), ref.singular_values.double().numpy(), rtol=tol["rtol"] * 10)
    if dtype == torch.float64:
        assert tj.regions(0.1).counts == ref.regions(0.1).counts
    assert next(gpu_model.parameters()).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compares the CUDA run with the CPU run")
def test_matrix_free_estimates_on_cuda_equal_the_cpu_run() -> None:
    from dimscope.jacobian import TrainConfig, UnrolledTraining
    from dimscope.jacobian.matrix_free import bulk_size_slq, top_singular

    cfg = TrainConfig(optimizer="adam", lr=0.02, batch_size=8, epochs=2)
    model, X, y = _jacobian_problem()
    runs = [UnrolledTraining(m, X, y, cfg, dtype=torch.float64) for m in (model, copy.deepcopy(model).cuda())]
    assert runs[1].X.device.type == "cuda" and runs[1].traj.thetas[0].device.type == "cuda"  # not silently on the CPU
    tops = [top_singular(r, k=3, solver="arpack", tol=1e-10) for r in runs]
    np.testing.assert_allclose(tops[1].values, tops[0].values, rtol=1e-7)
    bulks = [bulk_size_slq(r, tau=0.1, probes=4, steps=20, seed=3) for r in runs]
    assert bulks[1].bulk == pytest.approx(bulks[0].bulk, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_dtype,points_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_decorrelation_pretraining_takes_the_points_in_the_models_dtype(device: str, model_dtype: torch.dtype,
                                                                       points_dtype: torch.dtype) -> None:
    from dimscope.staircase.epsrank import trapezoid
    from dimscope.staircase.pretrain import pretrain_first_layer

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(device=device, dtype=model_dtype)
    w0 = model[0].weight.detach().clone()
    res = pretrain_first_layer(model, (-1.0, 1.0), method="decorrelate", steps=20, lr=1e-2,
                               points=trapezoid((-1.0, 1.0), 129, dtype=points_dtype))
    assert model[0].weight.dtype == model_dtype and model[0].weight.device.type == device
    assert not torch.equal(model[0].weight.detach(), w0)
    assert len(res.losses) == 20 and res.losses[-1] < res.losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compares the CUDA run with the CPU run")
def test_first_layer_pretraining_and_eps_rank_on_cuda() -> None:
    from dimscope.staircase.pretrain import pretrain_first_layer

    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    gpu = copy.deepcopy(cpu).cuda()
    res = [pretrain_first_layer(m, (-1.0, 1.0), method="both", steps=30, lr=1e-2, eps=1e-3) for m in (cpu, gpu)]
    for a, b in ((res[1].before, res[0].before), (res[1].after, res[0].after)):
        assert a.count == b.count
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-4, atol=1e-6 * b.eigenvalues[0])
    torch.testing.assert_close(gpu[0].weight.detach().cpu(), cpu[0].weight.detach(), rtol=1e-3, atol=1e-4)
    assert res[1].losses[-1] == pytest.approx(res[0].losses[-1], rel=1e-3)
    assert res[0].losses[-1] < res[0].losses[0]  # the decorrelation did something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: compares the CUDA run with the CPU run")
def test_jacobian_experiments_on_cuda_equal_the_cpu_run() -> None:
    from dimscope.jacobian import training_jacobian
    from dimscope.jacobian.experiments import added_vector_kl, perturbation_linearity, restricted_training

    model, X, y = _jacobian_problem()
    Xte, yte = X[:12] + 0.1, y[:12]
    tj = training_jacobian(model, X, y, lr=0.05, batch_size=8, epochs=2, dtype=torch.float64)
    gpu = copy.deepcopy(model).cuda()
    noise = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # the same inputs for both
    for f in (
        lambda m: perturbation_linearity(m, tj, X, y, Xte, yte, indices=[0, 5], eps=(1e-3, 1.0)),
        lambda m: added_vector_kl(m, tj, {"test": Xte, "noise": noise}, [0, 1, 7]),
        lambda m: restricted_training(m, tj, X, y, Xte, yte, settings=[("bulk", 5, False), ("chaotic", 3, True)]),
    ):
        want, got = f(model), f(gpu)
        assert list(got.columns) == list(want.columns) and len(got) == len(want)
        for c in want.columns:
            if want[c].dtype.kind == "f":
                np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-7, atol=1e-12, err_msg=c)
            else:
                assert got[c].tolist() == want[c].tolist(), c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_float32_probe_follows_the_models_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    model = _mlp().to(device=device, dtype=dtype)
    probe = torch.randn(60, 12, generator=torch.Generator().manual_seed(6))  # float32, on the CPU
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0", "2"], background=False, weight_metrics=False,
                          metrics=["stable_rank", "participation_ratio"]) as tr:
        with pytest.warns(UserWarning, match=f"cast to {dtype} for this model"):
            got = tr.step(0)
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), dimscope.capture(model.eval(), ["0", "2"], clone=True) as cap:
        model(probe.to(device=device, dtype=dtype))  # what the user would have had to write
        outs = dict(cap.outputs)
    for layer in ("0", "2"):
        assert outs[layer].dtype == dtype
        s = numpy_spectrum(outs[layer].double(), True)
        assert got[(layer, "stable_rank")] == pytest.approx(s.sum() / s[0], rel=1e-9)
        assert got[(layer, "participation_ratio")] == pytest.approx(s.sum() ** 2 / (s**2).sum(), rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_corruptions_keep_the_datas_device(device: str) -> None:
    from dimscope.experiments._training import input_noise, label_noise

    x, y = torch.zeros(400, 3, device=device), torch.zeros(400, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(0)
    _, y2 = label_noise(1.0, 4)(x, y, 0, g)
    x2, _ = input_noise(0.5)(x, y, 0, g)
    assert y2.device.type == device and x2.device.type == device and y2.dtype == torch.long
    assert set(y2.unique().tolist()) == {0, 1, 2, 3}  # every label redrawn uniformly
    assert x2.std().item() == pytest.approx(0.5, rel=0.1)


def test_bfloat16_features_reach_the_linear_probes() -> None:
    from dimscope.experiments.formation import ridge_decodability
    from dimscope.probes import LinearProbe

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (80,), generator=g)
    X = (torch.randn(80, 6, generator=g) + 3.0 * y[:, None]).to(torch.bfloat16)  # separable
    probe = LinearProbe(kind="ridge", alpha=1e-3).fit(X, y)
    assert probe.score(X, y) > 0.95
    assert np.all(ridge_decodability(X, y, 2) > 0.95)


class _MixedPrecision(nn.Module):
    """A float64 scalar registered first, a float32 body: the first floating parameter is not the input's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros((), dtype=torch.float64))
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.log_temperature.exp().float()


class _TimeEmbedded(nn.Module):
    """bfloat16 weights; the float32 input is embedded in float32 first (as diffusion models do with
    timesteps): casting the input to bfloat16 first would change it (983 -> 984)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 16).to(torch.bfloat16)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = torch.sin(t[:, :1] * torch.arange(1, 9, dtype=t.dtype, device=t.device) / 100.0)
        return self.lin(emb.to(self.lin.weight.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,layer", [(_MixedPrecision, "body.0"), (_TimeEmbedded, "lin")])
def test_a_model_that_takes_the_probe_as_given_gets_it_unchanged(device: str, make, layer: str) -> None:
    import warnings as _w

    model = make().to(device)
    probe = torch.arange(900.0, 1000.0).reshape(-1, 1).repeat(1, 12)  # float32 values that bfloat16 would round
    with _w.catch_warnings():
        _w.simplefilter("error")  # no cast, so no warning
        with dimscope.Tracker(model, probe=probe, every=1, layers=[layer], background=False, weight_metrics=False,
                              metrics=["stable_rank"]) as tr:
            got = tr.step(0)[(layer, "stable_rank")]
    with torch.no_grad(), dimscope.capture(model.eval(), [layer], clone=True) as cap:
        model(probe.to(device))
        s = numpy_spectrum(cap.outputs[layer].double(), True)
    assert got == pytest.approx(s.sum() / s[0], rel=1e-9)


def test_formation_map_takes_labels_that_numpy_cannot_read_directly() -> None:
    from dimscope.experiments.formation import FormationMap

    model = _mlp()
    probe = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    labels = (probe[:, 0] > 0).float().requires_grad_()  # as a tensor fresh from a model would be (or on CUDA)
    ext = FormationMap(labels, every=1)
    with dimscope.Tracker(model, probe=probe, every=1, layers=["0"], background=False, extensions=[ext]) as tr:
        tr.step(0)
    assert ext.y_.tolist() == (probe[:, 0] > 0).long().tolist()


def test_when_the_cast_does_not_help_the_models_own_error_is_raised() -> None:
    model = _mlp().to(torch.bfloat16)
    probe = torch.randn(20, 10)  # float32 and the wrong width: the cast fixes the dtype, not the shape
    tr = dimscope.Tracker(model, probe=probe, every=1, layers=["0"], background=False, weight_metrics=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        tr.step(0)
    tr.close()
