"""The setup of Belrose & Scherlis (arXiv 2412.07003), REFERENCE.md section 1.

``load_digits``, X/16, ``train_test_split(test_size=197, random_state=0)``; MLP 64 -> 64 -> GELU(tanh)
-> 10 (4810 parameters); weights LeCun-normal truncated at two standard deviations (JAX's
``lecun_normal``: std = sqrt(1/fan_in)/0.8796, cut at +-2 std), both biases N(0, 0.125^2); SGD,
heavy-ball momentum 0.9, cosine decay from 0.1, batch 64, 25 epochs (625 steps), no shuffling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["digits_data", "paper_model", "PAPER_TRAINING", "paper_init_"]

#: keyword arguments of :func:`training_jacobian` for the paper's run.
PAPER_TRAINING: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "schedule": "cosine",
    "batch_size": 64, "epochs": 25, "shuffle": False, "loss": "cross_entropy",
}

#: std of a unit normal truncated to [-2, 2] (JAX's variance_scaling correction constant).
_TRUNC_STD = 0.87962566103423978


def digits_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train 1600x64, y_train, X_test 197x64, y_test): pixels / 16, the paper's split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=197, random_state=0)
    t = lambda a, d: torch.tensor(a, dtype=d)  # noqa: E731
    return t(Xtr, dtype), t(ytr, torch.long), t(Xte, dtype), t(yte, torch.long)


def paper_init_(model: nn.Module, seed: int, bias_std: float = 0.125) -> nn.Module:
    """LeCun-normal truncated weights and N(0, bias_std^2) biases for every Linear, in place."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                std = math.sqrt(1.0 / m.in_features) / _TRUNC_STD
                w = torch.empty_like(m.weight)
                nn.init.trunc_normal_(w, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=g)
                m.weight.copy_(w * std)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * bias_std)
    return model


def paper_model(seed: int = 0, hidden: int = 64, d_in: int = 64, n_classes: int = 10, init: str = "paper") -> nn.Sequential:
    """64 -> hidden -> GELU(tanh) -> 10 with the paper's initialization (``init="torch"``: PyTorch's)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, n_classes))
    if init == "paper":
        paper_init_(model, seed)
    elif init != "torch":
        raise ValueError(f"The 'init' parameter of paper_model must be one of 'paper', 'torch'. Got {init!r} instead.")
    return model
