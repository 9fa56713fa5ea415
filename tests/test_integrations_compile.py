"""torch.compile: hooks registered before compilation keep working; the probe runs on the eager module."""

from __future__ import annotations

import pytest
import torch

import dimscope
from dimscope.capture import count_hooks

from _integration_helpers import mlp


def _eager_values(model, x, layers):
    with torch.no_grad(), dimscope.capture(model, layers) as cap:
        model(x)
    return {k: dimscope.stable_rank(dimscope.spectrum(v)) for k, v in cap.outputs.items()}


def _check(backend, train=True, every=1):
    torch._dynamo.reset()
    model = mlp(seed=0)
    probe = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    # batch mode: the Tracker's hooks are registered BEFORE compilation, then traced into the compiled forward
    tracker = dimscope.Tracker(model, probe=probe, mode=("probe", "batch"), every=every, layers=["0", "2"],
                               background=False, weight_metrics=False)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for step in range(2 * every + 1):
        x = torch.randn(32, 12, generator=g)
        want_batch = _eager_values(model, x, ["0", "2"])  # eager, the weights the compiled forward will use
        loss = compiled(x).pow(2).mean()
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        vals = tracker.step(step, loss=loss.item())
        if step % every:
            continue
        # probe/centered (primary): the fixed probe through the eager module, weights after the update (if any)
        want_probe = _eager_values(model, probe, ["0", "2"])
        for layer in ("0", "2"):
            assert vals[(layer, "stable_rank")] == pytest.approx(want_probe[layer], rel=1e-9)
        # batch/centered: what the hooks saw inside the compiled forward
        got_batch = {r["layer"]: r["value"] for r in tracker.history
                     if r["step"] == step and r["convention"] == "batch/centered" and r["metric"] == "stable_rank"}
        assert got_batch == pytest.approx(want_batch, rel=1e-5)
    tracker.close()
    batch_steps = sorted({r["step"] for r in tracker.history if r["convention"] == "batch/centered"})
    assert batch_steps == list(range(0, 2 * every + 1, every))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("every", [1, 3])
def test_hooks_survive_torch_compile_dynamo(every):
    """Dynamo tracing (backend='aot_eager': no C compiler needed, the same hook semantics). With
    every > 1 the Tracker would otherwise remove its hooks between measurements, and the compiled
    graph would keep running without them."""
    _check("aot_eager", every=every)


@pytest.mark.slow
def test_hooks_survive_torch_compile_inductor():
    """The default inductor backend (needs a C compiler). Forward only: compiling the backward too
    doubles the C++ compilation time, and the hooks live in the forward."""
    _check("inductor", train=False)
