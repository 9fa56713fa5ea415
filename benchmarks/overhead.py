"""Training-time overhead of dimscope, and of ndtracker 2.0.0, as ratios measured side by side.

Setup (REFERENCE.md §2 / issue 2): MLP 784-256-128-10 (ReLU), Adam 1e-3, batch 64, random inputs,
the three Linear layers tracked, dimscope with its defaults. In each repeat every configuration
trains on the same batches, and the configurations take turns block by block (``--block`` steps
each, in a shuffled order), so a change in machine speed hits all of them alike; each total time
(tracker construction and close included) is divided by the untracked total of the same repeat,
and the median over repeats is reported. The shared 2-core machine this was written on changes
speed by up to 2x within seconds; whole runs one after another gave interquartile ranges of
±10 points, block interleaving a few points. Each timed block includes the
tracker's close(), i.e. every queued measurement is computed and written.

    python benchmarks/overhead.py [--steps 400] [--repeats 5]

Targets: batch-mode dimscope adds at most 1/5 of what ndtracker adds at identical settings; probe
mode (probe 512) adds at most 5 % every 50 steps and at most 50 % every 5 steps. Probe mode is
measured three ways: at its defaults (every metric and the whole float64 spectrum of every layer at
each measurement), ``probe-moments`` (``metrics=["stable_rank", "participation_ratio"],
spectra=None``: tr C, tr C² and λ_1, no eigendecomposition of the wide layers),
``probe-spectra50`` (the moment metrics at each measurement, everything every 50 steps) and
``probe-thread`` (the defaults on the measurement thread, ``background=True``, every 50 steps).
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
DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    """Wait for the accelerator's queued work before a clock is read (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


class MinimalBatchTracker:
    """The least a batch-mode measurement at ndtracker's settings can do on the training thread, written
    out by hand (no dimscope code): forward hooks (a copy of each layer's output) on the forward before
    each measured step only; every 10 measurements, per layer, one float64 cast, centering and batched
    Gram product by torch, one stacked float64 eigendecomposition (torch's LAPACK, where dimscope uses
    numpy's) split over two threads, the four metrics vectorised, and one SQLite insert and commit.
    What dimscope adds beyond it is bookkeeping."""

    def __init__(self, model: nn.Module, every: int, path: str) -> None:
        import sqlite3
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        self.every, self.pool = every, ThreadPoolExecutor(1)
        self.blas = lambda: threadpool_limits(1, user_api="blas")
        self.mods = [dict(model.named_modules())[n] for n in LAYERS]
        self.handles: list = []
        self.out: dict[str, torch.Tensor] = {}
        self.pending: list = []
        self.con = sqlite3.connect(path)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("CREATE TABLE scalars(step INTEGER, layer TEXT, metric TEXT, value REAL)")
        self.arm()

    def arm(self) -> None:
        def hook(name):
            def h(module, args, output):
                if torch.is_grad_enabled():
                    self.out[name] = output.detach().clone()
            return h

        self.handles = [m.register_forward_hook(hook(n)) for n, m in zip(LAYERS, self.mods)]

    def step(self, step: int) -> None:
        if step % self.every == 0:
            self.pending.append((step, self.out))
            self.out = {}
            if len(self.pending) >= 10:
                self.flush()
        if self.handles and (step + 1) % self.every:
            for h in self.handles:
                h.remove()
            self.handles = []
        elif not self.handles and (step + 1) % self.every == 0:
            self.arm()

    def flush(self) -> None:
        import numpy as np

        pending, self.pending = self.pending, []
        rows = []
        with self.blas():
            for name in LAYERS:
                X = torch.stack([o[name] for _, o in pending]).to(torch.float64)
                X.sub_(X.mean(dim=1, keepdim=True))
                n, d = X.shape[1], X.shape[2]
                G = (torch.matmul(X, X.mT) if n <= d else torch.matmul(X.mT, X)) / (n - 1)
                half = G.shape[0] // 2
                other = self.pool.submit(torch.linalg.eigvalsh, G[half:])
                E = torch.cat([torch.linalg.eigvalsh(G[:half]), other.result()]).flip(-1).clamp_min(0).numpy()[:, : min(n - 1, d)]
                tr = E.sum(1)
                sv = np.sqrt(E)
                metrics = {"stable_rank": tr / E[:, 0], "participation_ratio": tr**2 / (E**2).sum(1),
                           "energy_rank": (np.cumsum(E, 1) < 0.9 * tr[:, None]).sum(1) + 1.0, "nuclear_ratio": sv.sum(1) / sv[:, 0]}
                rows += [(st, name, k, float(v[j])) for j, (st, _) in enumerate(pending) for k, v in metrics.items()]
        self.con.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?)", rows)
        self.con.commit()

    def close(self) -> None:
        if self.pending:
            self.flush()
        for h in self.handles:
            h.remove()
        self.con.close()
        self.pool.shutdown()


class Job:
    """One configuration's training run, advanced a block of steps at a time."""

    def __init__(self, name: str, probe: torch.Tensor, tmp: Path) -> None:
        self.name, self.probe, self.tmp = name, probe, tmp
        self.model = make_model().to(DEVICE)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.on_step = None
        self.close = lambda: None
        self.drain = lambda: None  # waits for work a measurement thread still has queued

    def start(self) -> None:
        name, model = self.name, self.model
        if name == "untracked":
            self.on_step = lambda s, l: l.item()
        elif name.startswith("dimscope"):
            _, mode, every = name.split(":")
            # batch mode at ndtracker's settings: the same three layers, its four metrics, no weight spectra
            ndt_like = dict(mode="batch", weight_metrics=False, metrics=["stable_rank", "participation_ratio", "energy_rank", "nuclear_ratio"])
            kw = {
                "probe": dict(probe=self.probe),  # the defaults: every metric and the whole spectrum at each measurement
                # the moment metrics only, no stored spectra: no eigendecomposition of the wide layers
                "probe-moments": dict(probe=self.probe, metrics=["stable_rank", "participation_ratio"], spectra=None),
                # the moment metrics at each measurement, every metric and the spectra every 50 steps
                "probe-spectra50": dict(probe=self.probe, spectra_every=50),
                # the defaults, computed on the measurement thread (background=True) instead of batched at commits
                "probe-thread": dict(probe=self.probe, background=True),
                # the defaults, batched at commits on the training thread (background="batched", the CPU's "auto")
                "probe-batched": dict(probe=self.probe, background="batched"),
                "batch": ndt_like,
            }[mode]
            tr = dimscope.Tracker(model, every=int(every), layers=LAYERS, run=str(self.tmp / f"{name.replace(':', '_')}_{time.time_ns()}"), **kw)
            self.on_step = lambda s, l: tr.step(s, loss=l.item())
            self.close = tr.close
            # a block's queued thread work is the block's own: else it runs in the next configuration's turn
            self.drain = lambda: tr._worker.join() if tr._worker is not None else None
        elif name.startswith("minimal-batch"):
            tr = MinimalBatchTracker(model, int(name.split(":")[1]), str(self.tmp / f"minimal_{time.time_ns()}.db"))
            self.on_step = lambda s, l: (l.item(), tr.step(s))
            self.close = tr.close
        elif name.startswith("ndtracker"):
            from ndt import HighFrequencyTracker

            mods = dict(model.named_modules())
            tr = HighFrequencyTracker(model, layers=[mods[n] for n in LAYERS], layer_names=LAYERS,
                                      sampling_frequency=int(name.split(":")[1]), enable_jump_detection=False)
            self.on_step = lambda s, l: tr.log(s, l.item())
            self.close = tr.close
        else:
            raise ValueError(name)

    def run(self, batches, first_step: int) -> None:
        model, opt = self.model, self.opt
        for i, (x, y) in enumerate(batches):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            self.on_step(first_step + i, loss)


def one_repeat(configs: list[str], batches, probe, tmp: Path, block: int, rng: random.Random) -> dict[str, float]:
    """Every configuration trains on the same batches, interleaved block by block in a shuffled
    order; returns each one's total time (tracker construction and close included)."""
    jobs = {c: Job(c, probe, tmp) for c in configs}
    total = dict.fromkeys(configs, 0.0)
    for a in range(0, len(batches), block):
        order = configs[:]
        rng.shuffle(order)
        for c in order:
            sync()
            t0 = time.perf_counter()
            if a == 0:
                jobs[c].start()
                FIXED.setdefault(c, []).append(time.perf_counter() - t0)
            jobs[c].run(batches[a : a + block], a)
            jobs[c].drain()
            if a + block >= len(batches):
                sync()
                t1 = time.perf_counter()
                jobs[c].close()
                sync()
                FIXED[c][-1] += time.perf_counter() - t1
            sync()
            total[c] += time.perf_counter() - t0
    return total


# construction + close() of each configuration, per repeat (close computes what is still buffered)
FIXED: dict[str, list[float]] = {}


def floor(model_step: float, probe: torch.Tensor, n: int = 30, per_flush: int = 10) -> None:
    """What one probe measurement cannot avoid: the probe forward and the float64 spectra of its
    three layers (and, every 10th measurement, of the two weight matrices), timed alone, with the
    Tracker's kernel, threads and buffers; the spectra as the Tracker computes them, ``per_flush``
    measurements together at each commit."""
    from dimscope.spectrum import Workspace, batch_spectra
    from dimscope.tracker import _one_blas_thread, probe_forward

    model = make_model().to(DEVICE)
    threads = torch.get_num_threads()
    ws = Workspace()

    def best(f) -> float:
        f()
        ts = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    feats = [list(probe_forward(model, probe, LAYERS).values()) for _ in range(per_flush)]
    feats = [[x.clone() for x in layer] for layer in feats]  # distinct tensors, as ten measurements hold
    weights = [model[i].weight.detach() for i in (0, 2)]
    with _one_blas_thread():
        t_fwd = best(lambda: probe_forward(model, probe, LAYERS))
        t_spec = best(lambda: batch_spectra([(x, True, True) for m in feats for x in m], threads=threads, workspace=ws)) / per_flush
        t_w = best(lambda: batch_spectra([(w, None, True) for w in weights], threads=threads, workspace=ws)) / 10
        t_spec32 = best(lambda: spectra32([x for m in feats for x in m])) / per_flush
    per = t_fwd + t_spec + t_w
    budget = 2.5 * model_step  # what both probe targets allow one measurement: 5 % of 50 steps, 50 % of 5 steps
    print(f"floor of one probe measurement, timed alone: forward {t_fwd * 1e3:.2f} ms + float64 spectra {t_spec * 1e3:.2f} ms "
          f"(a flush of {per_flush} measurements / {per_flush}) + weight spectra {t_w * 1e3:.2f} ms (amortized) = {per * 1e3:.2f} ms; "
          f"an untracked step takes {model_step * 1e3:.2f} ms")
    print(f"  so probe mode cannot add less than {per / (5 * model_step):.1%} every 5 steps or {per / (50 * model_step):.1%} every 50")
    per32 = t_fwd + t_spec32
    print(f"  both probe targets allow one measurement 2.5 untracked steps, {budget * 1e3:.2f} ms; in float32 (Gram matrices and "
          f"eigenvalues, no weight spectra: not what dimscope computes) the floor would be forward {t_fwd * 1e3:.2f} ms + spectra "
          f"{t_spec32 * 1e3:.2f} ms = {per32 * 1e3:.2f} ms ({per32 / budget:.2f} of that budget)")


def spectra32(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The eigenvalues of the features' covariances in float32, by torch on its threads, stacked by
    size: the cheapest exact-algorithm alternative to dimscope's float64 kernel (timed in ``floor``)."""
    stacks: dict[int, list[torch.Tensor]] = {}
    for x in feats:
        X = x - x.mean(0, keepdim=True)
        G = X.mT @ X if X.shape[0] > X.shape[1] else X @ X.mT
        stacks.setdefault(G.shape[0], []).append(G)
    return [torch.linalg.eigvalsh(torch.stack(v)) for v in stacks.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=50, help="steps each configuration runs before the next one's turn")
    ap.add_argument("--only", default=None, help="comma-separated configurations to run (untracked is always run), "
                    "e.g. dimscope:probe:50,dimscope:probe-thread:50; the summary lines need the default set")
    ap.add_argument("--device", default="cpu", help="where the model trains, e.g. cuda (batches and probe live there too)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 784, generator=g).to(DEVICE), torch.randint(0, 10, (64,), generator=g).to(DEVICE))
               for _ in range(args.steps)]
    probe = torch.randn(512, 784, generator=g).to(DEVICE)
    configs = ["untracked", "dimscope:probe:50", "dimscope:probe:5", "dimscope:probe-moments:50", "dimscope:probe-moments:5",
               "dimscope:probe-spectra50:5", "dimscope:probe-thread:50", "dimscope:batch:5"]
    try:
        import ndt  # noqa: F401

        configs += ["ndtracker:5"] + (["minimal-batch:5"] if DEVICE.type == "cpu" else [])
    except ImportError:
        print("ndtracker is not installed (pip install ndtracker==2.0.0): its row is skipped")
    if args.only:
        configs = ["untracked", *(c for c in args.only.split(",") if c != "untracked")]
    times: dict[str, list[float]] = {c: [] for c in configs}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        one_repeat(configs, batches[: 2 * args.block], probe, Path(d), args.block, rng)  # warm-up
        for _ in range(args.repeats):
            for c, t in one_repeat(configs, batches, probe, Path(d), args.block, rng).items():
                times[c].append(t)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} CPU threads, {args.steps} steps x {args.repeats} repeats, interleaved in blocks of {args.block} steps")
    print("added time: the median over repeats of (time / the same repeat's untracked time - 1), with its interquartile range")
    print("(construct+close: the median time of the Tracker's construction and close(), which computes what is still buffered)")
    print(f"{'configuration':<28}{'median s':>10}{'added':>10}{'IQR':>20}{'construct+close ms':>20}")
    added = {}
    for c in configs:
        paired = sorted(t / u - 1 for t, u in zip(times[c], times["untracked"]))
        added[c] = statistics.median(paired)
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        fixed = statistics.median(FIXED[c][1:] or FIXED[c]) * 1e3
        print(f"{c:<28}{statistics.median(times[c]):>10.3f}{added[c]:>+10.1%}{f'[{q1:+.1%}, {q3:+.1%}]':>20}{fixed:>20.1f}")
    print()
    if args.only:
        return
    for variant in ("probe", "probe-moments", "probe-spectra50", "probe-thread"):
        for every, target in ((50, 0.05), (5, 0.50)):
            c = f"dimscope:{variant}:{every}"
            if c in added:
                print(f"{variant} every {every} adds {added[c]:.1%} (target <= {target:.0%}): {'met' if added[c] <= target else 'NOT met'}")
    floor(model_step=statistics.median(times["untracked"]) / args.steps, probe=probe)
    if "ndtracker:5" in added:
        ratio = added["dimscope:batch:5"] / added["ndtracker:5"] if added["ndtracker:5"] > 0 else float("nan")
        print(f"batch mode every 5 adds {added['dimscope:batch:5']:.1%}; ndtracker adds {added['ndtracker:5']:.1%}; "
              f"ratio {ratio:.2f} (target <= 0.20): {'met' if ratio <= 0.2 else 'NOT met'}")
        if "minimal-batch:5" not in added:
            return
        low = added["minimal-batch:5"] / added["ndtracker:5"] if added["ndtracker:5"] > 0 else float("nan")
        print(f"  the same float64 work without bookkeeping (MinimalBatchTracker, no dimscope code) adds {added['minimal-batch:5']:.1%}, "
              f"ratio {low:.2f}: dimscope's bookkeeping costs the difference, the arithmetic the rest")

if __name__ == "__main__":
    main()
