"""Benchmark: the dense 4810 x 4810 training Jacobian of the paper's setup (REFERENCE.md section 1).

Side by side in one process, on the same data, batches, schedule and initial parameters:

1. the float32 matrix-product peak of this machine (torch.mm 2048^3, best of several),
2. JAX ``jacfwd`` through a ``lax.scan`` of the 625 SGD-momentum steps (the baseline, 89 s measured
   on an idle 2-core machine),
3. dimscope's fast path (closed-form Hessian-vector products as batched GEMMs),
4. optionally (``--generic``) dimscope's generic ``vmap(jvp(grad))`` path on a subset of columns,
   extrapolated to all columns.

``--columns K`` computes only the first K columns of J (the same K for every method; times are then
also extrapolated to n columns) -- useful on a busy machine. The script prints times, their ratio,
the agreement of the Jacobians and the fraction of the measured matmul peak reached by the fast
path, counting its FLOPs exactly (GEMMs only).

    PYTHONPATH=src python benchmarks/jacobian.py [--columns 4810] [--threads 2] [--generic]
"""

from __future__ import annotations

import argparse
import os
import time


def _sync(torch, device) -> None:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(torch, threads: int, size: int = 2048, reps: int = 5, device=None) -> tuple[float, float]:  # noqa: ANN001
    """(GFLOP/s by wall time, GFLOP per CPU-second), best of ``reps`` float32 torch.mm."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        size = max(size, 8192)  # enough work per product to leave launch overhead behind
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        _sync(torch, device)
        t, c = time.perf_counter(), time.process_time()
        a @ b
        _sync(torch, device)
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return 2 * size**3 / best / 1e9, 2 * size**3 / best_cpu / 1e9


def jax_jacobian(theta0, Xtr, ytr, lrs, batches, columns: int):  # noqa: ANN001, ANN201
    import jax
    import jax.numpy as jnp
    import numpy as np

    H, D, C = 64, 64, 10
    Xb = jnp.asarray(np.stack([Xtr[b] for b in batches]))
    yb = jnp.asarray(np.stack([ytr[b] for b in batches]))
    lr = jnp.asarray(np.asarray(lrs, dtype=np.float32))

    def unflat(th):  # noqa: ANN001, ANN202
        i = 0
        W1 = th[i : i + H * D].reshape(H, D); i += H * D
        b1 = th[i : i + H]; i += H
        W2 = th[i : i + C * H].reshape(C, H); i += C * H
        return W1, b1, W2, th[i : i + C]

    def loss(th, x, y):  # noqa: ANN001, ANN202
        W1, b1, W2, b2 = unflat(th)
        z = jax.nn.gelu(x @ W1.T + b1, approximate=True) @ W2.T + b2
        return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])

    def train(th):  # noqa: ANN001, ANN202
        def step(carry, inp):  # noqa: ANN001, ANN202
            th, buf = carry
            x, y, a = inp
            buf = 0.9 * buf + jax.grad(loss)(th, x, y)
            return (th - a * buf, buf), None

        (th, _), _ = jax.lax.scan(step, (th, jnp.zeros_like(th)), (Xb, yb, lr))
        return th

    th0 = jnp.asarray(theta0)
    n = th0.shape[0]
    if columns >= n:
        f = jax.jit(jax.jacfwd(train))
        label = "jax.jacfwd"
        run = lambda: f(th0)  # noqa: E731
    else:
        E = jnp.eye(n, dtype=th0.dtype)[:columns]
        f = jax.jit(jax.vmap(lambda v: jax.jvp(train, (th0,), (v,))[1]))
        label = f"jax.vmap(jvp) x {columns} columns"
        run = lambda: f(E).T  # noqa: E731
    t = time.perf_counter()
    f.lower(th0 if columns >= n else E).compile()
    compile_s = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    J = run()
    J.block_until_ready()
    return np.asarray(J), time.perf_counter() - t, compile_s, label, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--columns", type=int, default=4810, help="columns of J to compute (4810 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="tangent chunk of the fast path")
    ap.add_argument("--generic", action="store_true", help="also time the generic vmap(jvp(grad)) path")
    ap.add_argument("--generic-columns", type=int, default=32)
    ap.add_argument("--skip-jax", action="store_true")
    ap.add_argument("--device", default="cpu", help="where dimscope's runs go, e.g. cuda (JAX takes its default device)")
    args = ap.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch on one GPU
    eigen = "true" if args.threads > 1 else "false"
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={args.threads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from dimscope.jacobian.core import UnrolledTraining
    from dimscope.jacobian.paper import PAPER_TRAINING, digits_data, paper_model
    from dimscope.jacobian.training import TrainConfig

    Xtr, ytr, _, _ = digits_data()
    model = paper_model(0).to(device)
    cfg = TrainConfig(**PAPER_TRAINING)
    n = sum(p.numel() for p in model.parameters())
    K = min(args.columns, n)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"paper setup: n = {n} parameters, 625 steps, {K} Jacobian columns, on {where}, load {os.getloadavg()}")

    peak0, peak0_cpu = matmul_peak(torch, args.threads, device=device)
    mm = 8192 if device.type == "cuda" else 2048
    print(f"float32 matmul peak (torch.mm {mm}^3, best of 5): {peak0:.1f} GFLOP/s wall, {peak0_cpu:.1f} GFLOP per CPU-second"
          + (" (on a GPU the CPU-second figures count the host spinning in synchronize: read the wall figures)" if device.type == "cuda" else ""))

    # dimscope fast path
    t = time.perf_counter()
    run = UnrolledTraining(model, Xtr, ytr, cfg, method="mlp")
    primal_s = time.perf_counter() - t
    chunk = args.chunk or 64
    _sync(torch, device)
    t, cpu = time.perf_counter(), time.process_time()
    cols = []
    for s in range(0, K, chunk):
        e = min(K, s + chunk)
        V = torch.zeros(e - s, n, device=device)
        V[torch.arange(e - s), torch.arange(s, e)] = 1
        cols.append(run.jvp(V))
    J_fast = torch.cat(cols).T.cpu().numpy()
    fast_s = time.perf_counter() - t
    fast_cpu = time.process_time() - cpu
    H, D, C, B, T = 64, 64, 10, 64, run.n_steps
    flops = K * T * (2 * 2 * B * (D + 1) * H + 4 * 2 * B * H * C)
    print(f"dimscope fast path: {fast_s:.1f} s for {K} columns (+ {primal_s:.1f} s primal run); "
          f"{flops / 1e12:.2f} TFLOP of GEMMs -> {flops / fast_s / 1e9:.1f} GFLOP/s; CPU time {fast_cpu:.1f} s "
          f"-> {flops / fast_cpu / 1e9:.1f} GFLOP per CPU-second")

    if args.generic:
        rg = UnrolledTraining(model, Xtr, ytr, cfg, method="generic")
        kg = min(args.generic_columns, K)
        V = torch.zeros(kg, n, device=device)
        V[torch.arange(kg), torch.arange(kg)] = 1
        t = time.perf_counter()
        Jg = rg.jvp(V).T.cpu().numpy()
        gs = time.perf_counter() - t
        print(f"dimscope generic vmap(jvp(grad)): {gs:.1f} s for {kg} columns -> {gs * n / kg:.0f} s extrapolated to {n}; "
              f"max |diff| vs fast {np.abs(Jg - J_fast[:, :kg]).max():.2e}")

    if not args.skip_jax:
        theta0 = run.theta0.cpu().numpy()
        J_jax, jax_s, jax_compile, label, jax_cpu = jax_jacobian(theta0, Xtr.numpy(), ytr.numpy(), run.traj.lrs, [b.numpy() for b in run.traj.batches], K)
        diff = np.abs(J_jax[:, :K] - J_fast).max() / np.abs(J_jax).max()
        print(f"{label}: {jax_s:.1f} s, CPU {jax_cpu:.1f} s (+ {jax_compile:.1f} s compile); max relative |J_jax - J_fast| = {diff:.2e}")
        peak1, peak1_cpu = matmul_peak(torch, args.threads, device=device)
        peak, peak_cpu = max(peak0, peak1), max(peak0_cpu, peak1_cpu)
        print(f"float32 matmul peak after: {peak1:.1f} GFLOP/s wall, {peak1_cpu:.1f} GFLOP per CPU-second")
        scale = n / K
        print("\nSUMMARY")
        print(f"  JAX {label}: {jax_s:.1f} s  (x{scale:.2f} -> {jax_s * scale:.0f} s for all {n} columns)")
        print(f"  dimscope fast path: {fast_s:.1f} s  (x{scale:.2f} -> {fast_s * scale:.0f} s for all {n} columns)")
        print(f"  speed-up vs JAX: {jax_s / fast_s:.2f}x wall, {jax_cpu / fast_cpu:.2f}x CPU time")
        print(f"  fraction of float32 matmul peak ({peak:.1f} GFLOP/s): {flops / fast_s / 1e9 / peak:.1%} by wall time, "
              f"{flops / fast_cpu / 1e9 / peak_cpu:.1%} by CPU time ({peak_cpu:.1f} GFLOP per CPU-second)")
        print(f"  load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
