"""What Tracker.step costs on a step it does not measure, by how the loss is passed.

    python benchmarks/step_scalars.py [--steps 20000] [--repeats 5]

Three ways to pass the loss: a float, ``loss.item()`` (the three-line example), and the tensor
itself (``loss.detach()``: on an accelerator it is copied there and read with the next
measurement or commit, sparing a wait for the device at every step; a CPU tensor is read at once).
Prints the median microseconds per call over the repeats, and their ratio to the float's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

import dimscope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    loss = torch.tensor(0.5, requires_grad=True) * 2
    ways = {"float": lambda: 0.5, "loss.item()": loss.item, "loss.detach()": loss.detach}
    times: dict[str, list[float]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as d:
        tr = dimscope.Tracker(nn.Sequential(nn.Linear(10, 8)), probe=torch.randn(16, 10), every=10**9, layers="0", run=f"{d}/r")
        tr.step(0)  # the one measurement: the rest are plain steps
        step = 1
        for _ in range(args.repeats):
            for name, value in ways.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tr.step(step, loss=value())
                    step += 1
                times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
        tr.close()
    base = statistics.median(times["float"])
    print(f"torch {torch.__version__}, {args.steps} steps x {args.repeats} repeats, CPU")
    for name, ts in times.items():
        print(f"step(loss={name:<14}) {statistics.median(ts):6.2f} us per call  ({statistics.median(ts) / base:.2f}x the float's)")


if __name__ == "__main__":
    main()
