"""Grokking on modular addition: the reproduction recipe for geometry-before-behaviour (REFERENCE.md §4).

Task: inputs ``(a, b, =)`` with ``a, b`` in ``0 … p-1`` and ``=`` the token ``p``; the answer
``(a + b) mod p`` is read from the logits at the last position (the *answer position*). The data set
is all p² pairs; a seeded split gives ``train_fraction`` of them to training, the rest is held out.

Model (one layer by default, no LayerNorm, as in the grokking literature): token + learned position
embeddings (width 64, both initialised N(0, 1/64)), causal multi-head attention (4 heads), a ReLU MLP of width 512, each added
to the residual stream, then a linear unembedding to p classes. Training: AdamW, lr 3e-3,
weight decay 1.0, betas (0.9, 0.98), full batch. REFERENCE.md §4 measured grokking around step
~1750–2500 for this configuration; *measured here with this code* (3 seeds, 3000 steps), seeds 0 and
2 generalised to unseen pairs early (by steps ~225 and ~425) and seed 1 memorised without
generalising, so whether a seed groks late depends on the seed (and on the initialisation: with
PyTorch's N(0, 1) embeddings one seed still generalised slowly, 0.25 on unseen pairs at step 3000).
The *easy variant* trains on a large fraction of the pairs (0.9), where held-out accuracy
follows training accuracy.

Every ``checkpoint_every`` steps a state_dict is written as ``step_<N>.safetensors`` and the series
is then analysed through :mod:`dimscope.checkpoints` exactly as a user's series would be
(:func:`analyze_grokking_dir`).

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
* **behaviour**: accuracy on the *unseen* pairs — held-out pairs whose mirror (b, a) is held out too.
  With a train fraction of 0.5 the model answers about half of all held-out pairs early, by
  commutativity (it has seen (b, a)); that plateau (~0.46) is not the grokking transition, and it
  sits close to the half-gain level of t_beh, so the behaviour curve leaves those pairs out. The
  accuracy on all held-out pairs (``test_acc``), the training accuracy and the held-out loss are
  stored too. The probes are trained on every pair the model has seen (in some order) and scored on
  the unseen pairs, so a probe answers for inputs the model never saw, as the behaviour does
  (``probe_rows="random"``: a seeded 70/30 split of all pairs instead).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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
        # N(0, 1/d) rather than PyTorch's N(0, 1): with unit-variance embeddings the same recipe had not
        # generalised to unseen pairs after 2000 steps (seed 1); with N(0, 1/d) it grokked by 1500–2000.
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(d_model))
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

    Returns ``{"tokens", "labels", "a", "b", "train_idx", "test_idx", "unseen_idx"}`` (index tensors into
    the p² rows). ``unseen_idx``: the held-out pairs whose mirror (b, a) is held out too — pairs the model
    has seen in neither order, which it cannot answer by commutativity alone.
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(p * p, generator=g)
    n_train = int(round(train_fraction * p * p))
    train_idx = perm[:n_train].sort().values
    in_train = torch.zeros(p * p, dtype=torch.bool)
    in_train[train_idx] = True
    mirror = b * p + a  # the row of (b, a)
    unseen = (~in_train) & (~in_train[mirror])
    return {
        "tokens": tokens,
        "labels": labels,
        "a": a,
        "b": b,
        "train_idx": train_idx,
        "test_idx": perm[n_train:].sort().values,
        "unseen_idx": torch.nonzero(unseen).reshape(-1),
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


# --- analysing a checkpoint series of this recipe --------------------------------------------------

CONFIG_FILE = "grok_config.json"
#: What the precursor artifacts keep of each series (for the report's figure).
CURVE_METRICS = ["rankme", "probe_acc", "unseen_acc", "test_acc", "train_acc"]

#: The two variants of the reproduction: the grokking regime and the easy control.
VARIANTS: dict[str, float] = {"grokking": DEFAULT_CONFIG.train_fraction, "easy": EASY_TRAIN_FRACTION}


def save_config(cfg: GrokConfig, checkpoint_dir: str | Path) -> Path:
    import json

    path = Path(checkpoint_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=1))
    return path


def load_config(checkpoint_dir: str | Path) -> GrokConfig:
    """The :class:`GrokConfig` written beside a recipe's checkpoints (``grok_config.json``)."""
    import json

    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the command line analyses checkpoint folders written by the grokking recipe "
            "(they hold grok_config.json). For another model use dimscope.checkpoints.analyze_checkpoints in Python."
        )
    d = json.loads(path.read_text())
    d["betas"] = tuple(d.get("betas", (0.9, 0.98)))
    return GrokConfig(**d).validate()


def analyze_grokking_dir(
    checkpoint_dir: str | Path,
    store: Any = None,
    *,
    target: str = "sum",
    layers: Sequence[str] | None = None,
    probe_rows: str = "unseen",
    probe_test_fraction: float = 0.3,
    probe_seed: int = 0,
    probe_kind: str = "ridge",
    probe_alpha: float = 1e-3,
    on_error: str = "skip",
) -> tuple[pd.DataFrame, list[str]]:
    """Analyse a recipe checkpoint folder through :class:`dimscope.checkpoints.CheckpointSeries`.

    Probe set: all p² pairs. Geometry and probes: the residual stream at the answer position of
    ``layers`` (default :meth:`GrokTransformer.residual_layers`). Probe split, identical at every
    checkpoint: ``probe_rows="unseen"`` (default) trains each probe on every pair the model has seen
    in some order and scores it on the unseen pairs (the behaviour's pairs); ``"random"`` holds out a
    seeded ``probe_test_fraction`` of all p² pairs (``probe_seed``). Behaviour: ``test_acc`` (held-out pairs), ``train_acc``,
    ``test_loss``. Returns (long DataFrame of values, messages of skipped checkpoints).
    """
    from ..checkpoints import CheckpointSeries, analyze_checkpoints
    from ..probes import ProbeSplit, probe_split

    cfg = load_config(checkpoint_dir)
    data = modular_addition_data(cfg.p, cfg.train_fraction, cfg.seed if cfg.data_seed is None else cfg.data_seed)
    layers = list(layers) if layers is not None else GrokTransformer.residual_layers(cfg.n_layers)
    tokens, labels = data["tokens"], data["labels"]
    tr, te = data["train_idx"], data["test_idx"]
    y = probe_target(data["a"], data["b"], cfg.p, target)
    check_choice(probe_rows, "probe_rows", ("unseen", "random"), owner="analyze_grokking_dir")
    un = data["unseen_idx"]
    if probe_rows == "unseen" and len(un):
        # probes trained on every pair the model has seen (in some order), scored on the pairs it never saw
        unseen = np.zeros(len(y), dtype=bool)
        unseen[un.numpy()] = True
        split = ProbeSplit(np.nonzero(~unseen)[0], np.nonzero(unseen)[0], probe_seed, len(y))
    else:
        split = probe_split(len(y), probe_test_fraction, probe_seed)
    series = CheckpointSeries(checkpoint_dir, model_factory=lambda: build_model(cfg))

    def feats(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return answer_position_features(model, tokens, layers)

    def behaviour(model: nn.Module, logits: torch.Tensor) -> dict[str, float]:
        pred = logits.argmax(-1)
        return {
            "test_acc": float((pred[te] == labels[te]).float().mean()),
            "unseen_acc": float((pred[un] == labels[un]).float().mean()) if len(un) else float("nan"),
            "train_acc": float((pred[tr] == labels[tr]).float().mean()),
            "test_loss": float(nn.functional.cross_entropy(logits[te], labels[te])),
        }

    if store is not None:
        store.set_manifest({"config": {"recipe": "grokking", **cfg.to_dict(), "probe_target": target,
                                       "probe_rows": probe_rows, "probe_test_fraction": probe_test_fraction, "probe_seed": probe_seed,
                                       "position": "answer (last token)"}})
    df = analyze_checkpoints(
        series, feats, targets=y, split=split, probe_kind=probe_kind, probe_alpha=probe_alpha,
        behaviour=behaviour, store=store, on_error=on_error,
    )
    return df, [str(e) for e in series.errors]


def curves(
    df: pd.DataFrame, metric: str = "rankme", behaviour: str = "unseen_acc"
) -> tuple[pd.Series, dict[str, pd.Series], dict[str, pd.Series]]:
    """(``behaviour`` curve, {layer: ``metric``}, {layer: probe accuracy}) from :func:`analyze_grokking_dir`'s frame."""
    act = df[df["space"] == "activation"]
    layers = list(dict.fromkeys(act["layer"]))

    def one(metric_name: str, layer: str) -> pd.Series:
        s = act[(act["metric"] == metric_name) & (act["layer"] == layer)].set_index("step")["value"]
        return s.sort_index()

    beh = df[(df["space"] == "training") & (df["metric"] == behaviour)].set_index("step")["value"].sort_index()
    geo = {lay: one(metric, lay) for lay in layers}
    prb = {lay: one("probe_acc", lay) for lay in layers if (act["metric"] == "probe_acc").any()}
    return beh, geo, prb


# --- the reproduction ------------------------------------------------------------------------------

#: Defaults of the full reproduction and of ``--quick`` (tests).
FULL = {"p": 53, "steps": {"grokking": 3000, "easy": 1000}, "checkpoint_every": 25, "seeds": (0, 1, 2)}
QUICK = {"p": 23, "steps": {"grokking": 400, "easy": 200}, "checkpoint_every": 20, "seeds": (0,), "d_mlp": 128}


def _one_series(run: str, variant: str, cfg_dict: dict[str, Any], target: str, fmt: str, keep_checkpoints: bool, threads: int | None) -> dict[str, Any]:
    """Train one (variant, seed), write its checkpoints, analyse them into ``run/seeds/<variant>_seed<k>``."""
    import shutil

    from ..store import RunStore

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = GrokConfig(**{**cfg_dict, "betas": tuple(cfg_dict["betas"])})
    ckdir = Path(run) / "checkpoints" / variant / f"seed{cfg.seed}"
    if ckdir.exists():
        shutil.rmtree(ckdir)
    save_config(cfg, ckdir)
    c0, t1 = time.process_time(), time.perf_counter()
    out = train_grokking(cfg, ckdir, fmt=fmt)
    c1, t2 = time.process_time(), time.perf_counter()
    with RunStore(Path(run) / "seeds" / f"{variant}_seed{cfg.seed}", overwrite=True) as store:
        df, errors = analyze_grokking_dir(ckdir, store, target=target)
    c2, t3 = time.process_time(), time.perf_counter()
    if not keep_checkpoints:
        shutil.rmtree(ckdir)
    hist = out["history"]
    return {
        "df": df, "errors": errors, "train_s": t2 - t1, "analyse_s": t3 - t2, "train_cpu_s": c1 - c0, "analyse_cpu_s": c2 - c1,
        "final_train_acc": float(hist["train_acc"].iloc[-1]), "final_test_acc": float(hist["test_acc"].iloc[-1]),
    }


def run_precursor(
    run: str | Path,
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    variants: Sequence[str] = ("grokking", "easy"),
    steps: Mapping[str, int] | None = None,
    checkpoint_every: int | None = None,
    target: str = "sum",
    fmt: str = "safetensors",
    keep_checkpoints: bool = True,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    **gap_params: Any,
) -> dict[str, Any]:
    """Train every variant × seed, write checkpoints, analyse them and compute the precursor gap.

    Layout under ``run``: ``checkpoints/<variant>/seed<k>/step_<N>.safetensors`` (+ ``grok_config.json``),
    ``seeds/<variant>_seed<k>/`` (one run store per series: every metric, spectra, probe and
    behaviour scalars), and the run store of ``run`` itself with the artifacts
    ``precursor/per_seed``, ``precursor/per_layer``, ``precursor/curves`` (DataFrames) and
    ``precursor/summary`` (JSON: per variant the intervals, verdicts and the criterion).
    ``jobs`` > 1 trains the series in that many processes (one thread each).

    Returns ``{"per_seed", "per_layer", "summary", "curves", "seconds", "timings"}``.
    """
    from ..analysis.precursor import precursor_gap
    from ..store import RunStore

    base = QUICK if quick else FULL
    seeds = tuple(base["seeds"] if seeds is None else seeds)
    for v in variants:
        check_choice(v, "variants", tuple(VARIANTS), owner="run_precursor")
    check_choice(target, "target", PROBE_TARGETS, owner="run_precursor")
    jobs = check_int(jobs, "jobs", min_value=1, owner="run_precursor")
    steps_map = {**base["steps"], **dict(steps or {})}
    every = check_int(checkpoint_every if checkpoint_every is not None else base["checkpoint_every"], "checkpoint_every", min_value=1, owner="run_precursor")
    run = Path(run)
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    p = base["p"]
    tasks = []
    for variant in variants:
        for seed in seeds:
            cfg = GrokConfig(p=p, train_fraction=VARIANTS[variant], seed=seed, steps=steps_map[variant],
                             checkpoint_every=every, d_mlp=base.get("d_mlp", DEFAULT_CONFIG.d_mlp)).validate()
            tasks.append((variant, seed, cfg.to_dict()))
    results: dict[tuple[str, int], dict[str, Any]] = {}

    def report(variant: str, seed: int, r: dict[str, Any]) -> None:
        say(f"{variant} seed {seed}: trained {steps_map[variant]} steps in {r['train_s']:.1f} s ({r['train_cpu_s']:.1f} s CPU), "
            f"analysed {r['df']['step'].nunique()} checkpoints in {r['analyse_s']:.1f} s ({r['analyse_cpu_s']:.1f} s CPU); "
            f"final train acc {r['final_train_acc']:.3f}, held-out acc {r['final_test_acc']:.3f}")
        for e in r["errors"]:
            say(f"  skipped: {e}")

    if jobs == 1:
        for variant, seed, cd in tasks:
            results[(variant, seed)] = r = _one_series(str(run), variant, cd, target, fmt, keep_checkpoints, None)
            report(variant, seed, r)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_one_series, str(run), v, cd, target, fmt, keep_checkpoints, 1): (v, s) for v, s, cd in tasks}
            for f, key in futs.items():
                results[key] = f.result()
                report(*key, results[key])

    per_seed, per_layer, curve_frames, summaries = [], [], [], {}
    for variant in variants:
        behs, geos, prbs = {}, {}, {}
        for seed in seeds:
            df = results[(variant, seed)]["df"]
            behs[seed], geos[seed], prbs[seed] = curves(df)
            frame = df[df["metric"].isin(CURVE_METRICS)][["step", "layer", "metric", "value"]].copy()
            frame.insert(0, "seed", seed)
            frame.insert(0, "variant", variant)
            curve_frames.append(frame)
        n_classes = p if target == "sum" else 2
        res = precursor_gap(behs, geos, prbs, chance=1.0 / p, probe_chance=1.0 / n_classes, **gap_params)
        ps = res.per_seed.copy()
        ps.insert(0, "variant", variant)
        pl = res.per_layer.copy()
        pl.insert(0, "variant", variant)
        per_seed.append(ps)
        per_layer.append(pl)
        summaries[variant] = {**res.summary, "train_fraction": VARIANTS[variant], "steps": steps_map[variant],
                              "checkpoint_every": every, "p": p, "target": target}
    per_seed_df = pd.concat(per_seed, ignore_index=True)
    per_layer_df = pd.concat(per_layer, ignore_index=True)
    curves_df = pd.concat(curve_frames, ignore_index=True)
    seconds = time.perf_counter() - t0
    timings = {f"{v}_seed{s}": {k: r[k] for k in ("train_s", "analyse_s", "train_cpu_s", "analyse_cpu_s")} for (v, s), r in results.items()}
    cpu_total = sum(t["train_cpu_s"] + t["analyse_cpu_s"] for t in timings.values())
    summary = {"variants": summaries, "quick": quick, "seeds": list(seeds), "seconds": seconds, "cpu_seconds": cpu_total,
               "timings": timings, "behaviour": "accuracy on unseen pairs (held out in both orders)",
               "criterion": next(iter(summaries.values()))["criterion"] if summaries else ""}
    with RunStore(run) as store:
        store.set_manifest({"config": {"recipe": "precursor", "quick": quick, "seeds": list(seeds), "variants": list(variants),
                                       "p": p, "target": target, "checkpoint_every": every, "steps": steps_map}})
        store.put_artifact("precursor/per_seed", per_seed_df)
        store.put_artifact("precursor/per_layer", per_layer_df)
        store.put_artifact("precursor/curves", curves_df)
        store.put_artifact("precursor/summary", summary)
        store.commit()
    return {"per_seed": per_seed_df, "per_layer": per_layer_df, "summary": summary, "curves": curves_df, "seconds": seconds, "timings": timings}
