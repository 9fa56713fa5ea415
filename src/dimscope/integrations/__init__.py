"""dimscope where people already work: Lightning, Hugging Face, experiment trackers, torch.distributed.

Each integration lives in its own submodule and imports its package only when used, so importing
:mod:`dimscope` (or this package) never imports Lightning, transformers, TensorBoard, MLflow or W&B:

* :mod:`dimscope.integrations.lightning` — ``DimscopeCallback`` for ``lightning.pytorch.Trainer``;
* :mod:`dimscope.integrations.huggingface` — ``DimscopeCallback`` for ``transformers.Trainer``;
* :mod:`dimscope.integrations.sinks` — mirror metrics to TensorBoard, MLflow, W&B or CSV;
* :mod:`dimscope.integrations.distributed` — ``DistributedTracker`` for DDP / FSDP.

``torch.compile`` needs no integration: give the Tracker the eager module and create it before
compiling. The probe forward then runs eagerly on the shared parameters; hooks registered before
compilation (batch mode registers them when the Tracker is created) are traced into the compiled
graph by Dynamo and keep working; a hook registered after the compiled forward first ran is not seen
by the cached graph (Dynamo does not guard on hooks). See the README section "Integrations".
"""

from __future__ import annotations

__all__: list[str] = []
