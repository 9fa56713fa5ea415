"""layers="auto" on tiny models of each family, and finite Tracker metrics for each."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dimscope
from dimscope.architectures import auto_layers, clear_rules, explain_auto_layers, register_rule
from dimscope.capture import capture


# -- tiny models -----------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return torch.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, stride=2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """A custom skip wrapper with no 'Block' in its name: found from its forward's source."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class TorchEncoder(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(d, 20)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tok)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class HandTransformer(nn.Module):
    def __init__(self, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, 20)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        x = self.tok(tok)
        for b in self.blocks:
            x = b(x)
        return self.unembed(self.ln_f(x))


class TinyViT(nn.Module):
    def __init__(self, d: int = 16, n: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(p), -1, -1), p], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def gpt_neox() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=20,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=20, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


CASES = {
    "mlp": (mlp, lambda: torch.randn(32, 8), "mlp", ["0", "2", "4"]),
    "cnn": (cnn, lambda: torch.randn(16, 1, 8, 8), "cnn", ["3", "5"]),
    "resnet": (TinyResNet, lambda: torch.randn(16, 1, 8, 8), "resnet", ["layer1.0", "layer1.1", "layer2.0"]),
    "torch_encoder": (TorchEncoder, lambda: torch.randint(0, 20, (8, 6)), "transformer", ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]),
    "hand_transformer": (HandTransformer, lambda: torch.randint(0, 20, (8, 6)), "transformer", ["blocks.0", "blocks.1"]),
    "vit": (TinyViT, lambda: torch.randn(16, 1, 8, 8), "vit", ["blocks.0", "blocks.1"]),
    "gpt_neox": (gpt_neox, lambda: torch.randint(0, 20, (8, 6)), "transformer", ["gpt_neox.layers.0", "gpt_neox.layers.1"]),
    "gpt2": (gpt2, lambda: torch.randint(0, 20, (8, 6)), "transformer", ["transformer.h.0", "transformer.h.1", "transformer.h.2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auto_picks_documented_layers(case: str) -> None:
    make, _, family, expected = CASES[case]
    torch.manual_seed(0)
    model = make()
    res = explain_auto_layers(model)
    assert res.family == family
    assert res.layers == expected
    assert auto_layers(model) == expected
    assert dimscope.resolve_layers(model, "auto") == expected


@pytest.mark.parametrize("case", list(CASES))
def test_tracker_finite_metrics_per_family(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make, data, family, expected = CASES[case]
    torch.manual_seed(0)
    model = make()
    probe = data()
    with dimscope.Tracker(model, probe=probe, every=1, layers="auto", background=False, weight_metrics=False) as tr:
        values = tr.step(0, loss=1.0)
    err = capsys.readouterr().err
    assert f"layers='auto' → {family}: {len(expected)} layers" in err  # printed at start
    assert tr.layers == expected
    for layer in expected:
        for metric in ("stable_rank", "participation_ratio", "effective_rank"):
            v = values[(layer, metric)]
            assert math.isfinite(v) and v >= 1.0 - 1e-9, (layer, metric, v)


def test_block_outputs_are_the_residual_stream() -> None:
    """A hand-built block's hooked output equals x + attn + mlp as computed by hand."""
    torch.manual_seed(0)
    model = HandTransformer().eval()
    tok = torch.randint(0, 20, (4, 5))
    with torch.no_grad(), capture(model, "auto") as cap:
        model(tok)
        x = model.tok(tok)
        for b in model.blocks:
            x = b(x)
    assert torch.allclose(cap.outputs["blocks.1"], x)


def test_gpt2_block_output_is_hidden_state() -> None:
    model = gpt2().eval()
    tok = torch.randint(0, 20, (2, 6))
    with torch.no_grad(), capture(model, "auto") as cap:
        out = model(tok, output_hidden_states=True)
    # hidden_states[i + 1] is the residual stream after block i (the last one after ln_f)
    assert torch.allclose(cap.outputs["transformer.h.0"], out.hidden_states[1], atol=1e-6)
    assert cap.outputs["transformer.h.1"].shape == (2, 6, 16)


def test_custom_residual_wrapper_found_from_source() -> None:
    model = nn.Sequential(nn.Linear(4, 8), Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), Residual(nn.Linear(8, 8)), nn.Linear(8, 2))
    res = explain_auto_layers(model)
    assert (res.family, res.layers) == ("resnet", ["1", "2"])


def test_cnn_conv_outside_sequential_is_tracked_at_its_output() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))

    assert explain_auto_layers(Net()).layers == ["conv1", "conv2"]


def test_register_rule_overrides_and_validates() -> None:
    model = mlp()
    try:
        register_rule(lambda m: ["2"], name="mine")
        res = explain_auto_layers(model)
        assert (res.family, res.layers) == ("mine", ["2"])
        register_rule(lambda m: ["nope"], name="bad")
        with pytest.raises(ValueError, match="'bad' returned names that are not module paths"):
            explain_auto_layers(model)
    finally:
        clear_rules()
    assert explain_auto_layers(model).family == "mlp"
    with pytest.raises(TypeError, match="'rule' parameter of register_rule must be callable"):
        register_rule("x")  # type: ignore[arg-type]


def test_auto_with_nothing_to_track_is_an_error() -> None:
    with pytest.raises(ValueError, match="'layers' parameter is 'auto'"):
        dimscope.resolve_layers(nn.Sequential(nn.ReLU()), "auto")


def test_explicit_layers_override_auto() -> None:
    model = TinyResNet()
    assert dimscope.resolve_layers(model, ["fc"]) == ["fc"]
