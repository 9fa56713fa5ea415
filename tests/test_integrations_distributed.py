"""DistributedTracker: 2 gloo processes on CPU give the values of one process on the same probe (1e-6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dimscope
from dimscope.integrations.distributed import DistributedTracker, shard_bounds
from dimscope.integrations.sinks import CSVSink
from dimscope.metrics import compute_metrics

from _integration_helpers import mlp, read_csv_sink, store_values

PROBE_N = 37  # odd: the two ranks measure 19 and 18 rows
EVERY = 2
HIDDEN = 48  # layers "0" and "2" are wider (48) than the probe (37 rows): rows are all-gathered;
# layer "4" has 3 features: its 3 x 3 Gram matrix is all-reduced. Both paths are checked.


def _probe() -> torch.Tensor:
    return torch.randn(PROBE_N, 12, generator=torch.Generator().manual_seed(7)) * 3.0 + 5.0  # a large mean


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = mlp(seed=0, hidden=HIDDEN)
        with pytest.raises(ValueError, match=r"at least one sample per rank \(world size 2\). Got 1 samples"):
            DistributedTracker(model, probe=torch.randn(1, 12))
        # extensions that need the whole probe in one process are refused on every rank
        from dimscope.experiments.formation import FormationMap
        from dimscope.transitions.noise import NoiseFloor

        with pytest.raises(ValueError, match=r"cannot hold \['noise_floor', 'formation'\]: they measure the whole probe"):
            DistributedTracker(model, probe=_probe(), extensions=[NoiseFloor(every=2), FormationMap(torch.zeros(PROBE_N, dtype=torch.long))])
        later = DistributedTracker(model, probe=_probe())
        with pytest.raises(ValueError, match=r"cannot hold \['noise_floor'\]"):
            later.add_extension(NoiseFloor(every=2))  # added later: refused too
        later.close()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        sink = CSVSink(f"{tmp}/sink_rank{rank}.csv")  # every rank builds it; only rank 0 opens and writes it
        tracker = DistributedTracker(model, probe=_probe(), every=EVERY, layers=["0", "2", "4"], run=f"{tmp}/run",
                                     conventions=("centered", "uncentered"), max_rows=None, extensions=[sink],
                                     mode=("probe", "batch"))
        for step in range(5):
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
            if step % EVERY == 0:  # what batch mode measures: this batch under the weights before the update
                torch.save(x, f"{tmp}/batch_rank{rank}_step{step}.pt")
                if rank == 0:
                    torch.save(model.state_dict(), f"{tmp}/pre_state_step{step}.pt")
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            values = tracker.step(step, loss=loss.item())
            if step % EVERY == 0:
                assert values is not None and values[("2", "stable_rank")] > 0
                torch.save(values, f"{tmp}/values_rank{rank}_step{step}.pt")
                if rank == 0:
                    torch.save(model.state_dict(), f"{tmp}/state_step{step}.pt")
        tracker.close()
        assert tracker.probe_bounds == shard_bounds(PROBE_N, world, rank)
        dist.barrier()  # neither rank tears the group down while the other may still be using it
    finally:
        dist.destroy_process_group()


def _stop_worker(rank: int, world: int, tmp: str) -> None:
    import datetime
    import types

    from dimscope.experiments import StopOnAlert

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    try:
        out = {}
        # (a) a StopOnAlert on every rank; the alert reaches rank 0's extension only
        # (b) the same, the alert pushed to rank 1's copy (no tracker of its own: handled at once)
        for case, alerted in (("a", 0), ("b", 1)):
            trainer = types.SimpleNamespace(should_stop=False)  # each rank's own, as Lightning's DDP launcher makes them
            stopper = StopOnAlert(trainer=trainer, poll=False)
            tracker = DistributedTracker(mlp(seed=0), probe=_probe(), every=2, layers=["0"], extensions=[stopper])
            seen = []
            for step in range(4):
                if rank == alerted and step == 1:
                    stopper.notify({"step": 1, "layer": "0", "metric": "stable_rank", "payload": {"alert": "test"}})
                tracker.step(step)
                seen.append((trainer.should_stop, stopper.should_stop))
            tracker.close()
            out[case] = seen
        # (c) a StopOnAlert on rank 0 only (extensions are used there): no rank waits for the others
        tracker = DistributedTracker(mlp(seed=0), probe=_probe(), every=2, layers=["0"],
                                     extensions=[StopOnAlert(poll=False)] if rank == 0 else [])
        for step in range(3):
            tracker.step(step)
        with pytest.raises(ValueError, match="must be given at construction"):
            DistributedTracker(mlp(seed=0), probe=_probe(), every=2, layers=["0"]).add_extension(StopOnAlert(poll=False))
        tracker.close()
        out["c"] = "done"
        torch.save(out, f"{tmp}/stop_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_stop_requested_on_one_rank_reaches_every_rank_at_the_same_step(tmp_path):
    """StopOnAlert's extension lives on rank 0; without the sync the other ranks would train on and
    wait forever in their next collective."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_stop_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"stop_rank{rank}.pt")
        # the alert pushed before step 1 is handled in tracker.step(1) (rank 0: on the training thread, rank 1: at
        # once); every rank stops there
        assert out["a"] == out["b"] == [(False, False), (True, True), (True, True), (True, True)], rank
        assert out["c"] == "done"


def test_shard_bounds_cover_the_probe_once():
    for n, w in [(37, 2), (10, 3), (5, 5), (100, 7)]:
        bounds = [shard_bounds(n, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_without_a_process_group_it_is_a_tracker():
    model = mlp(seed=3)
    probe = _probe()
    a = DistributedTracker(model, probe=probe, every=1, background=False).step(0)
    b = dimscope.Tracker(model, probe=probe, every=1, background=False).step(0)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, nan_ok=True)


def test_gloo_two_processes_match_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    run = dimscope.open_run(tmp_path / "run")
    assert run.manifest["distributed"]["world_size"] == 2
    assert run.manifest["probe_size"] == PROBE_N
    steps = sorted(run.scalars(space="activation")["step"].unique().tolist())
    assert steps == [0, 2, 4]
    n_checked, worst = 0, 0.0
    for step in steps:
        model = mlp(seed=0, hidden=HIDDEN)
        model.load_state_dict(torch.load(tmp_path / f"state_step{step}.pt"))
        ref = dimscope.Tracker(model, probe=_probe(), every=EVERY, layers=["0", "2", "4"], background=False,
                               conventions=("centered", "uncentered"), max_rows=None)
        want = ref.step(step)
        ref.close()
        with torch.no_grad(), dimscope.capture(model.eval(), ["0", "2", "4"]) as cap:
            model(_probe())
        single_spectra = {(conv, layer): dimscope.spectrum(cap.outputs[layer], center=conv == "centered")
                          for conv in ("centered", "uncentered") for layer in ("0", "2", "4")}
        # values returned on both ranks equal the single process
        for rank in (0, 1):
            got = torch.load(tmp_path / f"values_rank{rank}_step{step}.pt")
            assert got.keys() - {("", "loss")} == want.keys()
            for k, v in want.items():
                assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (rank, step, k)
                if v != 0:
                    worst = max(worst, abs(got[k] - v) / abs(v))
                n_checked += 1
        # the store (rank 0) holds them too, for both conventions, and the spectra
        df = run.scalars(space="activation")
        for conv in ("centered", "uncentered"):
            for layer in ("0", "2", "4"):
                spec = run.spectra(layer, convention=f"probe/{conv}")[step]
                one = single_spectra[(conv, layer)]
                assert spec.n_samples == PROBE_N and spec.centered == (conv == "centered")
                assert len(spec.values) == len(one.values)
                assert spec.values == pytest.approx(one.values, rel=1e-6, abs=1e-9 * one.values[0])
                sel = df[(df.step == step) & (df.layer == layer) & (df.convention == f"probe/{conv}")]
                assert (sel.n_samples == PROBE_N).all()  # every rank's rows, not rank 0's share
                stored = dict(zip(sel.metric, sel.value))
                for m, v in compute_metrics(one, list(stored)).items():
                    assert stored[m] == pytest.approx(v, rel=1e-6, abs=1e-9) or (math.isnan(v) and math.isnan(stored[m]))
        # batch mode: the two ranks' live batches, stacked (rank order), under the pre-update weights
        model.load_state_dict(torch.load(tmp_path / f"pre_state_step{step}.pt"))
        feats: dict[str, list[torch.Tensor]] = {"0": [], "2": [], "4": []}
        for rank in (0, 1):
            with torch.no_grad(), dimscope.capture(model, ["0", "2", "4"]) as cap:
                model(torch.load(tmp_path / f"batch_rank{rank}_step{step}.pt"))
            for layer in feats:
                feats[layer].append(cap.outputs[layer])
        for conv in ("centered", "uncentered"):
            for layer in ("0", "2", "4"):
                one = dimscope.spectrum(torch.cat(feats[layer]), center=conv == "centered")
                sel = df[(df.step == step) & (df.layer == layer) & (df.convention == f"batch/{conv}")]
                assert len(sel) == len(compute_metrics(one, None))
                for m, v in compute_metrics(one, list(sel.metric)).items():
                    got_v = float(sel[sel.metric == m].value.iloc[0])
                    assert got_v == pytest.approx(v, rel=1e-6, abs=1e-9), ("batch", conv, step, layer, m)
                    if v != 0:
                        worst = max(worst, abs(got_v - v) / abs(v))
                    n_checked += 1
    assert n_checked > 50
    print(f"\ngloo 2 ranks vs 1 process: {n_checked} values, max relative difference {worst:.2e}")
    assert not (tmp_path / "sink_rank1.csv").exists()
    assert read_csv_sink(tmp_path / "sink_rank0.csv") == store_values(tmp_path / "run")


def _fsdp_worker(rank: int, world: int, tmp: str) -> None:
    import warnings

    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = mlp(seed=0, hidden=HIDDEN)
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = DistributedTracker(model, probe=_probe(), every=1, layers=["0", "2"], run=f"{tmp}/run", max_rows=None)
        assert any("parameters are sharded" in str(w.message) for w in caught)
        from dimscope.staircase.epsrank import FunctionSpaceEpsRank

        with pytest.raises(ValueError, match=r"cannot hold \['function_eps_rank'\] when the model's parameters are sharded"):
            tracker.add_extension(FunctionSpaceEpsRank(torch.randn(8, 12), layers=["0"]))  # refused on every rank
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(2):
            loss = model(torch.randn(16, 12, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            values = tracker.step(step, loss=loss.item())
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}  # a collective: every rank
        if rank == 0:
            torch.save(state, f"{tmp}/state.pt")
            torch.save(values, f"{tmp}/values.pt")
        tracker.close()
        dist.barrier()  # neither rank tears the group down while the other may still be using it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: the probe forward needs every rank; activations are exact."""
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model = mlp(seed=0, hidden=HIDDEN)
    model.load_state_dict(torch.load(tmp_path / "state.pt"))
    want = dimscope.Tracker(model, probe=_probe(), every=1, layers=["0", "2"], background=False, max_rows=None,
                            weight_metrics=False).step(1)
    got = torch.load(tmp_path / "values.pt")
    assert {k for k in got if k[0]} == {k for k in want if k[0]}
    for k in want:
        if k[0]:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    run = dimscope.open_run(tmp_path / "run")
    assert run.manifest["weight_metrics"] is False and run.manifest["distributed"]["sharded_parameters"] is True
    assert run.scalars(space="weight").empty


def _dtensor_scalar_worker(rank: int, world: int, tmp: str) -> None:
    import dimscope.tracker as trk
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        trk._DEFER_CPU_SCALARS = True  # the path an accelerator's tensor takes
        mesh = init_device_mesh("cpu", (world,))
        tr = dimscope.Tracker(mlp(), probe=_probe(), every=2, layers="0", background=False)
        for s in range(3):
            tr.step(s, loss=distribute_tensor(torch.tensor(2.5 + s), mesh, [Replicate()]), acc=torch.tensor(0.25 * s))
        tr.close()
        torch.save({m: [h["value"] for h in tr.history if h["metric"] == m] for m in ("loss", "acc")}, f"{tmp}/dtensor.pt")
    finally:
        dist.destroy_process_group()


def test_a_dtensor_scalar_is_read_at_step(tmp_path):
    """A DTensor loss (tensor parallelism, loss_parallel) has no stacked read: it is read at step()
    (deferred, it and the plain tensors beside it came out NaN)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_dtensor_scalar_worker, args=(1, str(tmp_path)), nprocs=1, join=True)
    assert torch.load(tmp_path / "dtensor.pt") == {"loss": [2.5, 3.5, 4.5], "acc": [0.0, 0.25, 0.5]}


def _tiny_worker(rank: int, world: int, tmp: str) -> None:
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 1), torch.nn.Flatten(0)).double()
        probe = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for name, scale in (("tiny", 1e-170), ("plain", 1.0)):
                tr = DistributedTracker(model, probe=probe * scale, every=1, layers=["0", "2"], background=False, weight_metrics=False)
                tr.step(0)
                tr.close()
                if rank == 0:
                    torch.save({(h["layer"], h["metric"]): h["value"] for h in tr.history if h["metric"] == "stable_rank"},
                               f"{tmp}/{name}.pt")
        torch.save([str(x.message) for x in w], f"{tmp}/warnings{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_values_too_small_for_float64_are_nan_on_every_rank_and_per_sample_outputs_do_not_warn(tmp_path):
    """The all-reduced Gram path (n > d) refuses an underflowing spectrum as one process does (it
    read a false 0 before); a (B,) output of each rank's probe slice is one value per input."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_tiny_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    tiny, plain = torch.load(tmp_path / "tiny.pt"), torch.load(tmp_path / "plain.pt")
    assert math.isnan(tiny[("0", "stable_rank")]) and plain[("0", "stable_rank")] > 1.0
    assert not math.isnan(plain[("2", "stable_rank")])
    for rank in (0, 1):
        msgs = torch.load(tmp_path / f"warnings{rank}.pt")
        assert not any("1-D output" in m for m in msgs), msgs
    assert any("too small for float64) in layer '0'" in m for m in torch.load(tmp_path / "warnings0.pt"))
