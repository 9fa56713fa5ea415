"""How far the matrix-free top-k spectrum of the training Jacobian scales on this machine.

The paper's setup (digits, SGD momentum 0.9, cosine from 0.1, batch 64, 625 steps) with a wider hidden
layer: n = 75 H + 10 parameters (H = 64: the paper's 4810; 256: 19,210; 1024: 76,810). For each width,
top-k singular values by LOBPCG on J^T J with block JVPs and VJPs through the recorded run, the
wall time, and the number of tangent/adjoint passes. ``--dense-from RUN`` compares the H = 64 values
with the dense spectrum stored by ``dimscope jacobian --run RUN`` (same seed, same setup).

    PYTHONPATH=src python benchmarks/jacobian_matrix_free.py --hidden 64,256 [--dense-from runs/jacobian_full]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="64,256")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--maxiter", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-from", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from dimscope.jacobian.core import UnrolledTraining
    from dimscope.jacobian.matrix_free import top_singular
    from dimscope.jacobian.paper import PAPER_TRAINING, digits_data, paper_model
    from dimscope.jacobian.training import TrainConfig

    Xtr, ytr, _, _ = digits_data()
    dense = None
    if args.dense_from:
        from dimscope.store import open_run

        dense = open_run(args.dense_from).artifact("jacobian/singular_values")
    print(f"load {os.getloadavg()}, {args.threads} thread(s)")
    for H in [int(h) for h in args.hidden.split(",")]:
        model = paper_model(0, hidden=H)
        t = time.perf_counter()
        run = UnrolledTraining(model, Xtr, ytr, TrainConfig(**PAPER_TRAINING))
        t_primal = time.perf_counter() - t
        top = top_singular(run, k=args.k, solver="lobpcg", maxiter=args.maxiter)
        line = (f"H={H:5d} n={run.n:7d}: top-{args.k} in {top.seconds / 60:.2f} min (+{t_primal:.0f} s primal), "
                f"{top.n_jvp} JVP + {top.n_vjp} VJP columns; sigma_1..3 = {np.round(top.values[:3], 3).tolist()}")
        if dense is not None and len(dense) == run.n:
            rel = np.abs(top.values - dense[: args.k]) / dense[: args.k]
            line += f"; max rel. diff vs dense = {rel.max():.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
