"""Where the added time of a tracked run goes, step by step: the training step and the
``tracker.step`` call timed separately at every optimizer step, by position in the measurement
cycle, against an untracked run on the same batches (runs interleaved, medians over repeats).

    python benchmarks/overhead_cycle.py [--steps 1000] [--repeats 3] [--config probe]

It shows what ``benchmarks/overhead.py``'s totals cannot: the cost of a measurement inside
``tracker.step``, the cost of a commit's batched computation, and the slowdown of the training
steps that follow a measurement (caches and memory the measurement displaced).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch
from torch import nn

import dimscope
from overhead import LAYERS, make_model

CONFIGS = {
    "probe": {},
    "probe-moments": {"metrics": ["stable_rank", "participation_ratio"], "spectra": None},
    "batch": {"mode": "batch", "weight_metrics": False,
              "metrics": ["stable_rank", "participation_ratio", "energy_rank", "nuclear_ratio"]},
}


def one_run(config: str | None, batches, probe, every: int, tmp: str) -> tuple[list[float], list[float]]:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tr = None
    if config is not None:
        kw = dict(CONFIGS[config])
        if kw.get("mode") != "batch":
            kw["probe"] = probe
        tr = dimscope.Tracker(model, every=every, layers=LAYERS, run=f"{tmp}/{config}_{time.time_ns()}", **kw)
    train, track = [0.0] * len(batches), [0.0] * len(batches)
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        t1 = time.perf_counter()
        if tr is not None:
            tr.step(i, loss=value)
        train[i], track[i] = t1 - t0, time.perf_counter() - t1
    if tr is not None:
        tr.close()
    return train, track


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="probe")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(args.steps)]
    probe = torch.randn(512, 784, generator=g)
    runs: dict[str | None, list[tuple[list[float], list[float]]]] = {None: [], args.config: []}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(args.config, batches[:100], probe, args.every, tmp)  # warm-up
        for _ in range(args.repeats):
            for c in random.sample(list(runs), len(runs)):
                runs[c].append(one_run(c, batches, probe, args.every, tmp))
    n = args.steps

    def med(c: str | None, k: int) -> list[float]:
        return [statistics.median(r[k][i] for r in runs[c]) for i in range(n)]

    base, train, track = med(None, 0), med(args.config, 0), med(args.config, 1)
    e = args.every
    print(f"{args.config} every {e}, {n} steps x {args.repeats} repeats; ms, medians over repeats, means over steps")
    print(f"{'step % every':<14}{'training step':>15}{'untracked':>12}{'tracker.step':>15}")
    for pos in range(e):
        idx = [i for i in range(e, n) if i % e == pos]
        print(f"{pos:<14}{statistics.mean(train[i] for i in idx) * 1e3:>15.3f}{statistics.mean(base[i] for i in idx) * 1e3:>12.3f}"
              f"{statistics.mean(track[i] for i in idx) * 1e3:>15.3f}")
    typical = statistics.median(track[i] for i in range(0, n, e))  # a measured step
    flushes = [i for i in range(n) if track[i] > 3 * typical]
    measured = n // e
    added_train = sum(train) - sum(base)
    print(f"per measurement: {sum(track) / measured * 1e3:.2f} ms in tracker.step (of which {len(flushes)} calls computed a commit's buffer), "
          f"{added_train / measured * 1e3:.2f} ms more in the training steps; an untracked step takes {statistics.mean(base) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
