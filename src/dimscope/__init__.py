"""dimscope: what happens inside a neural network while it trains.

The public namespace is small and explicit; everything else lives in the submodules.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .capture import capture, resolve_layers
from .metrics import (
    METRICS,
    effective_rank,
    energy_rank,
    eps_rank,
    measure,
    measure_ndt,
    nuclear_ratio,
    participation_ratio,
    rankme,
    stable_rank,
)
from .spectrum import Spectrum, spectrum, weight_spectrum
from .store import Run, RunStore, open_run
from .tracker import Tracker, TrackerExtension
from .staircase.epsrank import eps_rank_function_space

__all__ = [
    "__version__",
    "Spectrum",
    "spectrum",
    "weight_spectrum",
    "stable_rank",
    "participation_ratio",
    "effective_rank",
    "rankme",
    "eps_rank",
    "energy_rank",
    "nuclear_ratio",
    "measure",
    "measure_ndt",
    "METRICS",
    "capture",
    "resolve_layers",
    "Tracker",
    "TrackerExtension",
    "Run",
    "RunStore",
    "open_run",
    "eps_rank_function_space",
]

# The analysis areas load on first use (``dimscope.transitions``, ``dimscope.jacobian``...), so
# ``import dimscope`` stays light and never imports matplotlib or an integration's package.
_SUBMODULES = frozenset(
    {
        "analysis", "architectures", "checkpoints", "experiments", "integrations", "jacobian", "plot", "probes",
        "recipes", "report", "staircase", "transitions",
    }
)


def __getattr__(name: str):  # noqa: ANN202
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dimscope' has no attribute {name!r}")
