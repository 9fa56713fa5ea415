"""The small supervised training loop shared by the experiment templates.

One seed fixes three things independently: the model's initialization (``torch.manual_seed(seed)``
right before ``model_fn(seed)``), the mini-batch order (its own generator), and the corruption's
randomness (another generator). So two runs with the same seed see exactly the same batches in the
same order, and differ only where a corruption changed them.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int

__all__ = ["ClassificationData", "digits_data", "train_classifier", "per_class_accuracy", "build_model"]

#: ``corrupt(x, y, step, generator) -> (x, y)``: changes one training batch.
Corruption = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ClassificationData:
    """Train / test tensors of a classification task (labels are ints 0 … n_classes-1)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max())) + 1)

    def probe(self, n: int = 256) -> torch.Tensor:
        """The first ``n`` test inputs: the fixed probe set of the Tracker."""
        return self.X_test[:n]

    def validate(self, owner: str) -> ClassificationData:
        for name in ("X_train", "y_train", "X_test", "y_test"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"The 'data.{name}' parameter of {owner} must be a torch.Tensor. Got {type(getattr(self, name)).__name__}.")
        if len(self.X_train) != len(self.y_train) or len(self.X_test) != len(self.y_test):
            raise ValueError(f"The 'data' parameter of {owner} must have as many labels as inputs in train and test.")
        if len(self.X_train) < 2 or len(self.X_test) < 2:
            raise ValueError(f"The 'data' parameter of {owner} must hold at least 2 train and 2 test samples.")
        return self


def digits_data(n_test: int = 497, seed: int = 0) -> ClassificationData:
    """``load_digits`` (pixels / 16), a seeded split: 1300 train / 497 test by default."""
    from ..recipes.demo import digits_split

    Xtr, ytr, Xte, yte = digits_split(n_probe=n_test, seed=seed)
    return ClassificationData(Xtr, ytr, Xte, yte)


def build_model(model_fn: Callable[[int], nn.Module], seed: int) -> nn.Module:
    """``model_fn(seed)`` right after ``torch.manual_seed(seed)``: the same seed, the same weights."""
    torch.manual_seed(seed)
    model = model_fn(seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model_fn' parameter must return a torch.nn.Module. Got {type(model).__name__} instead.")
    return model


def _optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def train_classifier(
    model: nn.Module,
    data: ClassificationData,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    schedule: str = "constant",
    corrupt: Corruption | None = None,
    corrupt_window: tuple[int, int] | None = None,
    tracker: Any = None,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with cross-entropy for ``steps`` optimizer steps.

    ``corrupt`` changes the batches of the steps ``start <= step < end`` of ``corrupt_window``
    (all steps when the window is None). ``schedule="cosine"`` decays the learning rate as
    lr·½(1 + cos(π t / steps)); ``"constant"`` keeps it. ``tracker.step(step, loss=...)`` is called after every
    optimizer step; ``on_step(step, loss)`` too. ``stop()`` returning True ends training early.
    Returns ``{"steps_done", "final_loss"}``.
    """
    steps = check_int(steps, "steps", min_value=1, owner="train_classifier")
    batch_size = check_int(batch_size, "batch_size", min_value=1, owner="train_classifier")
    check_float(lr, "lr", low=0.0, low_inclusive=False, owner="train_classifier")
    check_choice(optimizer, "optimizer", ("adam", "sgd"), owner="train_classifier")
    check_choice(schedule, "schedule", ("constant", "cosine"), owner="train_classifier")
    opt = _optimizer(optimizer, model.parameters(), lr)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps)))
    g_batch = torch.Generator().manual_seed(10_000 + seed)
    g_corrupt = torch.Generator().manual_seed(20_000 + seed)
    n = len(data.X_train)
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=g_batch), 0
    model.train()
    loss_v = float("nan")
    done = 0
    for step in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g_batch), 0
        idx = perm[pos : pos + bs]
        pos += bs
        x, y = data.X_train[idx], data.y_train[idx]
        if corrupt is not None and (corrupt_window is None or corrupt_window[0] <= step < corrupt_window[1]):
            x, y = corrupt(x, y, step, g_corrupt)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_v = float(loss.item())
        done = step + 1
        if tracker is not None:
            tracker.step(step, loss=loss_v)
        if on_step is not None:
            on_step(step, loss_v)
        if stop is not None and stop():
            break
    return {"steps_done": done, "final_loss": loss_v}


@torch.no_grad()
def per_class_accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int) -> np.ndarray:
    """Accuracy on each class c: the share of test inputs of class c predicted as c (NaN if absent)."""
    was = model.training
    model.eval()
    try:
        pred = model(X).argmax(-1)
    finally:
        model.train(was)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        mask = y == c
        if bool(mask.any()):
            out[c] = float((pred[mask] == c).float().mean())
    return out


def label_noise(fraction: float, n_classes: int) -> Corruption:
    """Each label replaced, with probability ``fraction``, by a uniformly random class (maybe the same)."""
    fraction = check_float(fraction, "strength", low=0.0, high=1.0, owner="label_noise")
    n_classes = check_int(n_classes, "n_classes", min_value=2, owner="label_noise")

    def corrupt(x: torch.Tensor, y: torch.Tensor, step: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        flip = torch.rand(len(y), generator=g) < fraction  # drawn on the CPU (reproducible anywhere), used where y is
        rand = torch.randint(0, n_classes, (len(y),), generator=g)
        return x, torch.where(flip.to(y.device), rand.to(device=y.device, dtype=y.dtype), y)

    return corrupt


def input_noise(sigma: float) -> Corruption:
    """Gaussian noise of standard deviation ``sigma`` added to every input."""
    sigma = check_float(sigma, "strength", low=0.0, owner="input_noise")

    def corrupt(x: torch.Tensor, y: torch.Tensor, step: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device), y

    return corrupt
