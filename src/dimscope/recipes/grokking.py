"""Grokking on modular addition: the reproduction recipe for geometry-before-behaviour (REFERENCE.md §4).

Task: inputs ``(a, b, =)`` with ``a, b`` in ``0 … p-1`` and ``=`` the token ``p``; the answer
``(a + b) mod p`` is read from the logits at the last position (the *answer position*). The data set
is all p² pairs; a seeded split gives ``train_fraction`` of them to training, the rest is held out.

Model (one layer by default, no LayerNorm, as in the grokking literature): token + learned position
embeddings (width 64), causal multi-head attention (4 heads), a ReLU MLP of width 512, each added
to the residual stream, then a linear unembedding to p classes. Training: AdamW, lr 3e-3,
weight decay 1.0, betas (0.9, 0.98), full batch. With p = 53 and train fraction 0.5 the held-out
accuracy stays low while the training accuracy reaches 1, then rises ("groks") around step
~1750–2500. The *easy variant* trains on a large fraction of the pairs (0.9), where held-out accuracy
follows training accuracy.

Every ``checkpoint_every`` steps a state_dict is written as ``step_<N>.safetensors`` and the series
is then analysed through :mod:`dimscope.checkpoints` exactly as a user's series would be
(:func:`analyze_series`).

Per-checkpoint analysis (the default, documented in the README):

* **geometry**: the residual stream at the answer position at two points of every block —
  ``blocks.<i>.resid_mid`` (after attention) and ``blocks.<i>`` (after the MLP, the block's
  output) — on the probe set of all p² pairs; every dimscope metric of its centered spectrum
  (:func:`dimscope.spectrum`, :func:`dimscope.metrics.compute_metrics`). (The residual stream *before*
  the first block is the embedding of the constant ``=`` token at that position: it has no
  variance and is not measured.)
* **probes**: a linear probe per layer for a target of (a, b) — ``"sum"`` = (a + b) mod p (default)
  or ``"parity"`` = ((a + b) mod p) mod 2 — trained on a fixed seeded split of the probe set that is
  identical at every checkpoint (:mod:`dimscope.probes`).
* **behaviour**: held-out accuracy (pairs not in the model's training split); training accuracy and
  loss are stored too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._validation import check_choice, check_float, check_int

__all__ = [
    "GrokConfig",
    "GrokTransformer",
    "modular_addition_data",
    "train_grokking",
    "probe_target",
    "answer_position_features",
    "DEFAULT_CONFIG",
    "EASY_TRAIN_FRACTION",
]

EASY_TRAIN_FRACTION = 0.9


@dataclass
class GrokConfig:
    """The recipe's settings (defaults: REFERENCE.md §4, the configuration measured to grok)."""

    p: int = 53
    train_fraction: float = 0.5
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 512
    n_layers: int = 1
    lr: float = 3e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    steps: int = 3000
    checkpoint_every: int = 25
    seed: int = 0
    data_seed: int | None = None  # None: the same as ``seed``

    def validate(self) -> GrokConfig:
        owner = "GrokConfig"
        check_int(self.p, "p", min_value=3, owner=owner)
        check_float(self.train_fraction, "train_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, owner=owner)
        check_int(self.d_model, "d_model", min_value=1, owner=owner)
        check_int(self.n_heads, "n_heads", min_value=1, owner=owner)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"The 'd_model' parameter of GrokConfig must be divisible by n_heads ({self.n_heads}). Got {self.d_model}."
            )
        check_int(self.d_mlp, "d_mlp", min_value=1, owner=owner)
        check_int(self.n_layers, "n_layers", min_value=1, owner=owner)
        check_float(self.lr, "lr", low=0.0, low_inclusive=False, owner=owner)
        check_float(self.weight_decay, "weight_decay", low=0.0, owner=owner)
        check_int(self.steps, "steps", min_value=1, owner=owner)
        check_int(self.checkpoint_every, "checkpoint_every", min_value=1, owner=owner)
        check_int(self.seed, "seed", owner=owner)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


DEFAULT_CONFIG = GrokConfig()


# --- model --------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class _Block(nn.Module):
    """x → x + attn(x) (``resid_mid``) → + mlp(·) (the block's output, ``resid_post``)."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.attn = _Attention(d_model, n_heads)
        self.resid_mid = nn.Identity()  # a hook point: the residual stream after attention
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_mid(x + self.attn(x))
        return x + self.mlp(x)


class GrokTransformer(nn.Module):
    """A small decoder-only transformer without LayerNorm; ``forward`` returns (B, T, p) logits."""

    def __init__(self, p: int, d_model: int = 64, n_heads: int = 4, d_mlp: int = 512, n_layers: int = 1, n_ctx: int = 3) -> None:
        super().__init__()
        self.p = p
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList([_Block(d_model, n_heads, d_mlp) for _ in range(n_layers)])
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    @staticmethod
    def residual_layers(n_layers: int) -> list[str]:
        """The default measured points: ``blocks.<i>.resid_mid`` and ``blocks.<i>`` for every block."""
        out = []
        for i in range(n_layers):
            out += [f"blocks.{i}.resid_mid", f"blocks.{i}"]
        return out


def build_model(cfg: GrokConfig) -> GrokTransformer:
    """The model of ``cfg``, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return GrokTransformer(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers)


# --- data ---------------------------------------------------------------------------------------


def modular_addition_data(p: int, train_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """All p² pairs as ``tokens`` (p², 3) = (a, b, p), ``labels`` = (a+b) mod p, and a seeded split.

    Returns ``{"tokens", "labels", "a", "b", "train_idx", "test_idx"}`` (index tensors into the p² rows).
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(p * p, generator=g)
    n_train = int(round(train_fraction * p * p))
    return {
        "tokens": tokens,
        "labels": labels,
        "a": a,
        "b": b,
        "train_idx": perm[:n_train].sort().values,
        "test_idx": perm[n_train:].sort().values,
    }


PROBE_TARGETS = ("sum", "parity")


def probe_target(a: torch.Tensor, b: torch.Tensor, p: int, target: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Integer class labels for the probe: ``"sum"`` = (a+b) mod p, ``"parity"`` = ((a+b) mod p) mod 2,
    or a callable ``(a, b) -> labels``."""
    if callable(target):
        y = target(a, b)
    else:
        check_choice(target, "target", PROBE_TARGETS, owner="probe_target")
        s = (a + b) % p
        y = s if target == "sum" else s % 2
    return np.asarray(torch.as_tensor(y).cpu().numpy()).astype(np.int64)


def answer_position_features(
    model: nn.Module, tokens: torch.Tensor, layers: Sequence[str], *, position: int = -1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward under ``no_grad`` in eval mode: per layer the (n, d) residual stream at ``position``
    (the answer position by default) and the logits at that position."""
    from ..capture import capture

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, list(layers)) as cap:
            out = model(tokens)
        logits = out[:, position] if out.ndim == 3 else out
        feats = {}
        for name in layers:
            t = cap.outputs[name]
            feats[name] = (t[:, position] if t.ndim == 3 else t).detach().to(torch.float32).clone()
        return feats, logits.detach()
    finally:
        model.train(was_training)


# --- training -----------------------------------------------------------------------------------


def train_grokking(
    cfg: GrokConfig,
    checkpoint_dir: str | Path | None,
    *,
    fmt: str = "safetensors",
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one seed; write ``step_<N>.<fmt>`` state_dicts every ``cfg.checkpoint_every`` steps
    (and at the last step) into ``checkpoint_dir``.

    Returns ``{"model", "data", "history" (DataFrame: step, train_loss, train_acc, test_acc), "seconds"}``.
    The history is measured on the fly at every checkpoint step (for cross-checks; the analysis reads
    the checkpoints).
    """
    cfg.validate()
    check_choice(fmt, "fmt", ("safetensors", "pt"), owner="train_grokking")
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    data = modular_addition_data(cfg.p, cfg.train_fraction, data_seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    tokens, labels = data["tokens"], data["labels"]
    tr, te = data["train_idx"], data["test_idx"]
    x_tr, y_tr = tokens[tr], labels[tr]
    out_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if out_dir is None:
            return
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        path = out_dir / f"step_{step}.{fmt}"
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(path))
        else:
            torch.save(sd, path)

    def evaluate(step: int, train_loss: float) -> None:
        model.eval()
        with torch.no_grad():
            pred = model(tokens)[:, -1].argmax(-1)
        model.train()
        row = {
            "step": step,
            "train_loss": train_loss,
            "train_acc": float((pred[tr] == labels[tr]).float().mean()),
            "test_acc": float((pred[te] == labels[te]).float().mean()) if len(te) else float("nan"),
        }
        history.append(row)
        if progress is not None:
            progress(step, row)

    model.train()
    for step in range(cfg.steps + 1):
        # checkpoint step N holds the parameters after N optimizer steps
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with torch.no_grad():
                loss_now = float(nn.functional.cross_entropy(model(x_tr)[:, -1], y_tr))
            evaluate(step, loss_now)
            save(step)
        if step == cfg.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_tr)[:, -1], y_tr)
        loss.backward()
        opt.step()
    return {"model": model, "data": data, "history": pd.DataFrame(history), "seconds": time.perf_counter() - t0}
