"""Forward hooks on layers chosen by module path, and the conversion of outputs to feature matrices.

Layer names are module paths from ``model.named_modules()`` (``"encoder.layers.3.mlp"``). A
selection is an exact name, a glob (``"blocks.*.mlp"``), a list of either, a predicate
``(name, module) -> bool``, or ``"auto"``. Hooks exist only inside :class:`capture` (a context
manager) and are removed in ``finally``, also when the forward raises.

Output conversion (:func:`to_features`), one documented default:

* a tuple / list → its first tensor; a dict or a Hugging Face ``ModelOutput`` → ``last_hidden_state``
  / ``hidden_states`` / ``logits`` if present, else its first tensor value; a dataclass → its first
  tensor field;
* (B, D) → B samples × D features;
* (B, T, D) → tokens as samples: B·T samples × D features;
* (B, C, H, W) → channels as features, positions as samples: B·H·W samples × C features
  (``conv="flatten"`` gives B samples × C·H·W features instead);
* other ranks: B samples × everything else flattened.

Samples beyond ``max_rows`` are subsampled without replacement with a fixed seed, so the same
input shape always keeps the same rows.
"""

from __future__ import annotations

import inspect

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._validation import check_choice

__all__ = ["resolve_layers", "pick_tensor", "to_features", "capture", "LayerSelection", "auto_layers"]

LayerSelection = str | Sequence[str] | Callable[[str, nn.Module], bool] | None

_PREFERRED_KEYS = ("last_hidden_state", "hidden_states", "logits")


def _check_module(model: Any, owner: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter of {owner} must be a torch.nn.Module. Got {type(model).__name__} instead.")
    return model


def auto_layers(model: nn.Module) -> list[str]:
    """The default layer set per architecture family (see :mod:`dimscope.architectures`), announced on stderr."""
    from .architectures import auto_layers as _auto_layers

    return _auto_layers(model, announce=True)


def resolve_layers(model: nn.Module, layers: LayerSelection) -> list[str]:
    """Module paths selected by ``layers``, in ``named_modules()`` order, without duplicates.

    Raises ``ValueError`` listing the closest existing names when a name or glob matches nothing.
    """
    _check_module(model, "resolve_layers")
    names = [n for n, _ in model.named_modules() if n]
    if layers is None or (isinstance(layers, str) and layers == "auto"):
        chosen = auto_layers(model)
        if not chosen:
            raise ValueError(
                "The 'layers' parameter is 'auto' but the model has no Linear or conv layers; "
                f"name the layers to track. Modules: {', '.join(names[:20])}"
            )
        return chosen
    modules = dict(model.named_modules())
    if callable(layers) and not isinstance(layers, str):
        chosen = [n for n in names if layers(n, modules[n])]
        if not chosen:
            raise ValueError("The 'layers' predicate selected no module of the model.")
        return chosen
    if not isinstance(layers, str) and not isinstance(layers, Iterable):
        raise TypeError(
            "The 'layers' parameter must be a module path, a glob, a list of them, a predicate (name, module) -> bool "
            f"or 'auto'. Got {layers!r} ({type(layers).__name__})."
        )
    patterns = [layers] if isinstance(layers, str) else list(layers)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"The 'layers' parameter must hold module paths or globs (str). Got {p!r} ({type(p).__name__}) in {layers!r}.")
    if not patterns:
        raise ValueError("The 'layers' parameter is an empty list; name at least one layer.")
    selected: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"The 'layers' parameter must hold module-path strings. Got {pat!r}.")
        if any(ch in pat for ch in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        else:
            hits = [pat] if pat in modules and pat else []
        if not hits:
            close = difflib.get_close_matches(pat, names, n=5, cutoff=0.4)
            hint = f" Closest names: {', '.join(close)}." if close else f" Module names: {', '.join(names[:15])}."
            raise ValueError(f"Unknown layer {pat!r}: no module of the model has that path.{hint}")
        selected.update(hits)
    return [n for n in names if n in selected]


def pick_tensor(output: Any) -> torch.Tensor | None:
    """The tensor that stands for a module's output (see the module docstring), or None."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _PREFERRED_KEYS:
            val = output.get(key) if hasattr(output, "get") else None
            if isinstance(val, torch.Tensor):
                return val
        for val in output.values():
            t = pick_tensor(val)
            if t is not None:
                return t
        return None
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            t = pick_tensor(getattr(output, f.name))
            if t is not None:
                return t
        return None
    if isinstance(output, (tuple, list)):
        for val in output:
            t = pick_tensor(val)
            if t is not None:
                return t
    return None


def _subsample_rows(X: torch.Tensor, max_rows: int | None, seed: int) -> torch.Tensor:
    n = X.shape[0]
    if max_rows is None or n <= max_rows:
        return X
    g = torch.Generator().manual_seed(seed + n)
    idx = torch.randperm(n, generator=g)[:max_rows].sort().values
    return X.index_select(0, idx.to(X.device))


def to_features(t: torch.Tensor, *, max_rows: int | None = 4096, conv: str = "channels", seed: int = 0) -> torch.Tensor:
    """A module output as a 2-D (samples × features) matrix; see the module docstring."""
    check_choice(conv, "conv", ("channels", "flatten"), owner="to_features")
    if t.ndim == 0:
        raise ValueError("A layer output is a scalar; it has no samples to measure.")
    if t.ndim == 1:
        X = t.reshape(-1, 1)
    elif t.ndim == 2:
        X = t
    elif t.ndim == 3:
        X = t.reshape(-1, t.shape[-1])
    elif t.ndim == 4 and conv == "channels":
        X = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    else:
        X = t.reshape(t.shape[0], -1)
    return _subsample_rows(X, max_rows, seed)


def positional_index(module: nn.Module, name: str) -> int | None:
    """The position of parameter ``name`` among the positional arguments of ``module.forward`` (None
    if it takes none of that name, or its signature cannot be read)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: positions unknown
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


def as_token_mask(m: Any) -> torch.Tensor | None:
    """A (B, T) tensor marking real tokens (1 / True) as booleans; None for anything else."""
    return m.detach().bool() if isinstance(m, torch.Tensor) and m.ndim == 2 else None


# torch.compiler.is_compiling is torch >= 2.3; torch._dynamo.is_compiling before
_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


class capture:
    """Context manager that records the output tensor of each named layer on every forward.

    >>> with capture(model, ["fc1", "fc2"]) as cap:
    ...     model(x)
    >>> cap.outputs["fc1"].shape

    ``outputs`` holds, per layer, the detached output tensor of the most recent forward (a
    reference, or a copy with ``clone=True`` — needed when a later in-place op would change it).
    ``enabled`` can be switched off to skip recording; ``only_grad`` records only forwards run
    with grad enabled (training forwards). ``compiled`` becomes True once a hook has run inside a
    ``torch.compile``d forward: that graph keeps its hooks as they were when it was traced, so a
    caller that removes and re-registers hooks must stop doing so. With ``mask_key`` (e.g.
    ``"attention_mask"``), ``mask`` holds that (B, T) argument of the model's most recent recorded
    forward (by keyword, or by position where ``forward`` names a parameter so), as booleans (None
    when it had none).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelection,
        *,
        clone: bool = False,
        only_grad: bool = False,
        mask_key: str | None = None,
    ) -> None:
        self.model = _check_module(model, "capture")
        self.layers = resolve_layers(model, layers)
        # the modules, looked up once: a Tracker in batch mode registers the hooks anew before each
        # measured step, and walking a large model's named_modules() each time costs milliseconds
        named = dict(model.named_modules())
        self._modules = [named[name] for name in self.layers]
        self.clone = clone
        self.only_grad = only_grad
        self.enabled = True
        self.mask_key = mask_key
        self.mask: torch.Tensor | None = None
        self._mask_pos: tuple[Any, int | None] = (None, None)
        self.outputs: dict[str, torch.Tensor] = {}
        self.compiled = False
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _is_compiling():
                self.compiled = True  # Dynamo replays this after each run of the compiled graph
            if not self.enabled or (self.only_grad and not torch.is_grad_enabled()):
                return
            t = pick_tensor(output)
            if t is None:
                return
            t = t.detach()
            self.outputs[name] = t.clone() if self.clone else t

        return hook

    def _mask_hook(self, module: nn.Module, args: Any, kwargs: Mapping[str, Any]) -> None:
        if not self.enabled or (self.only_grad and not torch.is_grad_enabled()):
            return
        if self.mask_key is None:
            self.mask = None
            return
        m = kwargs.get(self.mask_key)
        if m is None and args:  # passed by position, e.g. model(input_ids, attention_mask)
            i = self._mask_position(module)
            m = args[i] if i is not None and i < len(args) else None
        self.mask = as_token_mask(m)

    def _mask_position(self, module: nn.Module) -> int | None:
        fwd = getattr(module.forward, "__func__", module.forward)  # an instance may replace forward
        if self._mask_pos[0] is not fwd:  # looked up once per forward method
            self._mask_pos = (fwd, positional_index(module, self.mask_key or ""))
        return self._mask_pos[1]

    def __enter__(self) -> capture:
        try:
            if self.mask_key is not None:
                self._handles.append(self.model.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
            for name, module in zip(self.layers, self._modules):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    @property
    def armed(self) -> bool:
        """Whether this object's hooks are registered (between ``__enter__`` and :meth:`remove`)."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def clear(self) -> None:
        self.outputs.clear()
        self.mask = None


def count_hooks(model: nn.Module) -> int:
    """The number of live forward / forward-pre / backward hooks on every module of ``model``."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return total


def iter_layer_weights(model: nn.Module, layers: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, weight) for each layer that has a ``weight`` parameter of 2+ dimensions."""
    modules = dict(model.named_modules())
    for name in layers:
        w = getattr(modules[name], "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim >= 2:
            yield name, w
