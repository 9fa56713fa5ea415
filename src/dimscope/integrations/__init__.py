"""dimscope where people already work: Lightning, Hugging Face, experiment trackers, torch.distributed.

Each integration lives in its own submodule and imports its package only when used, so importing
:mod:`dimscope` (or this package) never imports Lightning, transformers, TensorBoard, MLflow or W&B:

* :mod:`dimscope.integrations.lightning` — ``DimscopeCallback`` for ``lightning.pytorch.Trainer``;
* :mod:`dimscope.integrations.huggingface` — ``DimscopeCallback`` for ``transformers.Trainer``;
* :mod:`dimscope.integrations.sinks` — mirror metrics to TensorBoard, MLflow, W&B or CSV;
* :mod:`dimscope.integrations.distributed` — ``DistributedTracker`` for DDP / FSDP.

Notes on ``torch.compile`` are in :mod:`dimscope.integrations.distributed`'s sibling docs
(README section "Integrations"): hooks registered before compilation keep working.
"""

from __future__ import annotations

__all__: list[str] = []
