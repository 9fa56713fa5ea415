"""``layers="auto"``: a default layer set per architecture family, found from the module tree.

The rules run in this order; the first one that finds layers decides the family:

1. **User rules** added with :func:`register_rule` (hooks for custom architectures).
2. **Transformer / ViT** — the residual stream after each block. A *block list* is an
   ``nn.ModuleList`` / ``nn.Sequential`` whose children each contain an attention module
   (``nn.MultiheadAttention``, or a module whose class or attribute name contains ``attention`` /
   ``attn``) below them. The tracked layers are the children: ``encoder.layers.N``
   (``nn.TransformerEncoder``), ``transformer.h.N`` (GPT-2), ``gpt_neox.layers.N`` (GPT-NeoX),
   ``encoder.layer.N`` (BERT), ``blocks.N`` (hand-built). A block's output is the residual stream
   (Hugging Face blocks return tuples: the first tensor is the hidden state). The family is
   ``"vit"`` when the model also has a patch embedding (a ``Conv2d``, or a module named ``patch*``)
   outside the blocks, else ``"transformer"``. Only the outermost block lists count.
3. **ResNet** — residual block outputs. A *residual block* is a module that is not itself a conv,
   contains a conv (``Conv1d/2d/3d``) or ``Linear``, and whose ``forward`` adds a skip connection
   (its source contains ``+=`` or ``+ identity`` / ``x`` / ``h`` / ``residual`` / ``shortcut`` / ``skip`` /
   ``hidden_states`` ... — checked with :mod:`inspect`), or whose class name says so (``BasicBlock``,
   ``Bottleneck``, ``ResBlock``, ``ResidualBlock``). Only the outermost residual blocks count
   (``layer1.0``, ``layer1.1``, ... in torchvision-style ResNets).
4. **CNN** — conv block outputs. In an ``nn.Sequential``, a conv *block* is a conv followed by any
   run of norm / activation / pooling / dropout modules; its output is the last module of that
   run (e.g. ``features.2`` for ``Conv2d, BatchNorm2d, ReLU``). A conv outside a Sequential (its
   activation applied functionally in ``forward``) is tracked at its own output.
5. **MLP** — the output of every ``nn.Linear``.
6. Otherwise (``"custom"``): nothing is chosen, and ``resolve_layers`` raises an error asking for
   explicit ``layers=`` (or a rule).

The result is printed once when a Tracker or :class:`dimscope.capture` resolves ``"auto"``
(one line on stderr: family, count, names); pass an explicit ``layers=`` to override it, or add a
rule. :func:`explain_auto_layers` returns the decision with its reason.
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "AutoLayers",
    "auto_layers",
    "explain_auto_layers",
    "register_rule",
    "clear_rules",
    "FAMILIES",
]

FAMILIES = ("custom-rule", "vit", "transformer", "resnet", "cnn", "mlp", "custom")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BLOCK_TAIL = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
    nn.Hardswish,
    nn.PReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_RESIDUAL_CLASS = re.compile(r"(BasicBlock|Bottleneck|ResBlock|ResidualBlock|ResNetBlock|PreActBlock)$", re.I)
# "+=" anywhere, or "+ <skip name>" / "<skip name> +" in forward's source.
_SKIP_NAMES = r"(identity|residual|shortcut|skip|x|h|inp|inputs?|hidden_states?|self\.shortcut\(\w+\)|self\.downsample\(\w+\))"
_RESIDUAL_SRC = re.compile(r"\+=|\+\s*" + _SKIP_NAMES + r"\b|\b" + _SKIP_NAMES + r"\s*\+")


@dataclass
class AutoLayers:
    """What ``layers="auto"`` chose: the family, the module paths, and why."""

    family: str
    layers: list[str]
    reason: str
    details: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        shown = ", ".join(self.layers[:12]) + (f", ... (+{len(self.layers) - 12})" if len(self.layers) > 12 else "")
        return f"dimscope: layers='auto' → {self.family}: {len(self.layers)} layers ({self.reason}): {shown}"


Rule = Callable[[nn.Module], "list[str] | None"]
_RULES: list[tuple[str, Rule]] = []


def register_rule(rule: Rule, name: str = "custom-rule") -> None:
    """Add a rule ``rule(model) -> list of module paths | None`` consulted before the built-in ones.

    A rule that returns None or an empty list passes; the first rule that returns names wins and
    its ``name`` becomes the family. Rules are consulted newest first.
    """
    if not callable(rule):
        raise TypeError(f"The 'rule' parameter of register_rule must be callable. Got {type(rule).__name__} instead.")
    _RULES.insert(0, (str(name), rule))


def clear_rules() -> None:
    """Remove every rule added with :func:`register_rule`."""
    _RULES.clear()


# -- helpers ---------------------------------------------------------------------------------------
def _is_attention(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    leaf = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower()
    return "attention" in cls or leaf in ("attn", "attention", "self_attn", "self_attention") or cls.endswith("attn")


def _contains_attention(module: nn.Module) -> bool:
    return any(_is_attention(n, m) for n, m in module.named_modules() if n)


def _outermost(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:  # named_modules order: parents before children
        if not any(n.startswith(p + ".") for p in out):
            out.append(n)
    return out


def _forward_source(module: nn.Module) -> str:
    fwd = type(module).forward
    if fwd is nn.Module.forward or fwd is nn.Sequential.forward:
        return ""
    try:
        return textwrap.dedent(inspect.getsource(fwd))
    except (OSError, TypeError):
        return ""


def _strip_comments(src: str) -> str:
    lines = []
    for line in src.splitlines():
        s = line.split("#", 1)[0]
        if s.strip():
            lines.append(s)
    # drop the signature line(s) and docstrings roughly: a '+' there is not an addition anyway
    text = "\n".join(lines)
    return re.sub(r'("""|\'\'\')(.|\n)*?\1', "", text)


def _is_residual_block(name: str, module: nn.Module) -> bool:
    if isinstance(module, _CONV + (nn.Linear,)) or not name:
        return False
    if not any(isinstance(m, _CONV + (nn.Linear,)) for m in module.modules()):
        return False
    if _RESIDUAL_CLASS.search(type(module).__name__):
        return True
    src = _strip_comments(_forward_source(module))
    return bool(src) and bool(_RESIDUAL_SRC.search(src))


# -- the rules -------------------------------------------------------------------------------------
def _transformer_blocks(model: nn.Module) -> tuple[list[str], list[str]]:
    """(block paths, container paths) of the outermost attention-bearing block lists."""
    containers = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if not kids:
            continue
        hits = [k for k, c in kids if not _is_attention(k, c) and _contains_attention(c)]
        if hits and (len(hits) == len(kids) or len(hits) >= 2):
            containers.append((name, hits))
    chosen: list[tuple[str, list[str]]] = []
    for name, hits in containers:  # parents come before children: keep the outermost lists
        if not any(p == "" or name.startswith(p + ".") for p, _ in chosen):
            chosen.append((name, hits))
    blocks = [(f"{c}." if c else "") + k for c, hits in chosen for k in hits]
    return blocks, [c for c, _ in chosen]


def _has_patch_embedding(model: nn.Module, blocks: list[str]) -> bool:
    for name, m in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue
        if isinstance(m, nn.Conv2d) or "patch" in name.rsplit(".", 1)[-1].lower():
            return True
    return False


def _cnn_blocks(model: nn.Module) -> list[str]:
    out: list[str] = []
    seq_members: set[str] = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        kids = list(m.named_children())
        prefix = f"{name}." if name else ""
        i = 0
        while i < len(kids):
            k, c = kids[i]
            if isinstance(c, _CONV):
                seq_members.add(prefix + k)
                j = i
                while j + 1 < len(kids) and isinstance(kids[j + 1][1], _BLOCK_TAIL):
                    j += 1
                out.append(prefix + kids[j][0])
                i = j + 1
            else:
                i += 1
    for name, m in model.named_modules():
        if isinstance(m, _CONV) and name not in seq_members:
            out.append(name)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(out), key=order.__getitem__)


def explain_auto_layers(model: nn.Module) -> AutoLayers:
    """The layer set ``layers="auto"`` picks for ``model``, with its family and the reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"The 'model' parameter of auto_layers must be a torch.nn.Module. Got {type(model).__name__} instead.")
    names = [n for n, _ in model.named_modules() if n]
    for rule_name, rule in _RULES:
        chosen = rule(model)
        if chosen:
            chosen = list(chosen)
            unknown = [c for c in chosen if c not in names]
            if unknown:
                raise ValueError(f"The layer rule {rule_name!r} returned names that are not module paths: {unknown[:5]}.")
            return AutoLayers(rule_name, chosen, f"rule {rule_name!r}")
    blocks, containers = _transformer_blocks(model)
    if blocks:
        vit = _has_patch_embedding(model, blocks)
        return AutoLayers(
            "vit" if vit else "transformer",
            blocks,
            "residual stream after each block of " + ", ".join(repr(c) for c in containers),
            {"containers": containers},
        )
    residual = _outermost([n for n, m in model.named_modules() if _is_residual_block(n, m)])
    if residual:
        return AutoLayers("resnet", residual, "output of each residual block")
    if any(isinstance(m, _CONV) for m in model.modules()):
        return AutoLayers("cnn", _cnn_blocks(model), "output of each conv block (conv + norm/activation/pool)")
    linear = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if linear:
        return AutoLayers("mlp", linear, "output of each Linear layer")
    return AutoLayers("custom", [], "no Linear, conv, residual or attention block found")


def auto_layers(model: nn.Module, *, announce: bool = False) -> list[str]:
    """The module paths ``layers="auto"`` tracks (see the module docstring for the rules).

    With ``announce=True`` the choice is printed as one line on stderr.
    """
    result = explain_auto_layers(model)
    if announce and result.layers:
        print(result.summary(), file=sys.stderr)
    return result.layers
