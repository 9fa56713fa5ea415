"""Training-time overhead of dimscope, and of ndtracker 2.0.0, as ratios measured side by side.

Setup (REFERENCE.md §2 / issue 2): MLP 784-256-128-10 (ReLU), Adam 1e-3, batch 64, random inputs,
the three Linear layers tracked, dimscope with its defaults. Configurations are interleaved (each
repeat runs every configuration once, in a shuffled order) and each time is divided by the
untracked time of the same repeat; the median of those ratios is reported. The shared 2-core
machine this was written on changes speed by up to 2x from one second to the next, and pairing
within a repeat is what keeps that out of the ratios. Each timed block includes the
tracker's close(), i.e. every queued measurement is computed and written.

    python benchmarks/overhead.py [--steps 400] [--repeats 5]

Targets: batch-mode dimscope adds at most 1/5 of what ndtracker adds at identical settings; probe
mode (probe 512) adds at most 5 % every 50 steps and at most 50 % every 5 steps.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dimscope

LAYERS = ["0", "2", "4"]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, batches, on_step) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        on_step(step, loss)


def run_config(name: str, batches, probe, tmp: Path) -> float:
    model = make_model()
    t0 = time.perf_counter()
    if name == "untracked":
        train(model, batches, lambda s, l: l.item())
    elif name.startswith("dimscope"):
        _, mode, every = name.split(":")
        # batch mode at ndtracker's settings: the same three layers, its four metrics, no weight spectra
        ndt_like = dict(mode="batch", weight_metrics=False, metrics=["stable_rank", "participation_ratio", "energy_rank", "nuclear_ratio"])
        kw = dict(probe=probe) if mode == "probe" else ndt_like
        tr = dimscope.Tracker(model, every=int(every), layers=LAYERS, run=str(tmp / f"{name.replace(':', '_')}_{time.time_ns()}"), **kw)
        train(model, batches, lambda s, l: tr.step(s, loss=l.item()))
        tr.close()
    elif name.startswith("ndtracker"):
        from ndt import HighFrequencyTracker

        every = int(name.split(":")[1])
        mods = dict(model.named_modules())
        tr = HighFrequencyTracker(model, layers=[mods[n] for n in LAYERS], layer_names=LAYERS, sampling_frequency=every, enable_jump_detection=False)
        train(model, batches, lambda s, l: tr.log(s, l.item()))
        tr.close()
    else:
        raise ValueError(name)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(args.steps)]
    probe = torch.randn(512, 784, generator=g)
    configs = ["untracked", "dimscope:probe:50", "dimscope:probe:5", "dimscope:batch:5"]
    try:
        import ndt  # noqa: F401

        configs.append("ndtracker:5")
    except ImportError:
        print("ndtracker is not installed (pip install ndtracker==2.0.0): its row is skipped")
    times: dict[str, list[float]] = {c: [] for c in configs}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        for c in configs:  # warm-up
            run_config(c, batches[:20], probe, Path(d))
        for r in range(args.repeats):
            order = configs[:]
            rng.shuffle(order)
            for c in order:
                times[c].append(run_config(c, batches, probe, Path(d)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.repeats} interleaved repeats")
    print("added time: the median over repeats of (time / the same repeat's untracked time - 1), with its interquartile range")
    print(f"{'configuration':<22}{'median s':>10}{'added':>10}{'IQR':>20}")
    added = {}
    for c in configs:
        paired = sorted(t / u - 1 for t, u in zip(times[c], times["untracked"]))
        added[c] = statistics.median(paired)
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        print(f"{c:<22}{statistics.median(times[c]):>10.3f}{added[c]:>+10.1%}{f'[{q1:+.1%}, {q3:+.1%}]':>20}")
    print()
    print(f"probe mode every 50 adds {added['dimscope:probe:50']:.1%} (target <= 5%)")
    print(f"probe mode every 5 adds {added['dimscope:probe:5']:.1%} (target <= 50%)")
    if "ndtracker:5" in added:
        ratio = added["dimscope:batch:5"] / added["ndtracker:5"] if added["ndtracker:5"] > 0 else float("nan")
        print(f"batch mode every 5 adds {added['dimscope:batch:5']:.1%}; ndtracker adds {added['ndtracker:5']:.1%}; ratio {ratio:.2f} (target <= 0.20)")

if __name__ == "__main__":
    main()
