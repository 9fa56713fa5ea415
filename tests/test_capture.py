import dataclasses

import pytest
import torch
from torch import nn

from dimscope.capture import capture, count_hooks, pick_tensor, resolve_layers, to_features


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_resolve_exact_glob_list_predicate_auto():
    m = Net()
    assert resolve_layers(m, "head") == ["head"]
    assert resolve_layers(m, "encoder.*") == ["encoder.0", "encoder.1", "encoder.2"]
    assert resolve_layers(m, ["head", "encoder.0"]) == ["encoder.0", "head"]  # module order
    assert resolve_layers(m, lambda n, mod: isinstance(mod, nn.ReLU)) == ["encoder.1"]
    assert resolve_layers(m, "auto") == ["encoder.0", "encoder.2", "head"]


def test_unknown_layer_lists_closest_names():
    with pytest.raises(ValueError, match=r"Unknown layer 'encoder\.3'.*Closest names: .*encoder\.2"):
        resolve_layers(Net(), ["encoder.3"])
    with pytest.raises(ValueError, match="Unknown layer 'decoder.\\*'"):
        resolve_layers(Net(), "decoder.*")
    with pytest.raises(TypeError, match="'model' parameter of resolve_layers must be a torch.nn.Module"):
        resolve_layers("not a model", "head")


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: int = 0


def test_pick_tensor_structures():
    t = torch.zeros(2, 3)
    assert pick_tensor(t) is t
    assert pick_tensor((t, torch.ones(1))) is t
    assert pick_tensor({"aux": torch.ones(1), "last_hidden_state": t}) is t
    assert pick_tensor(Out(hidden=t)) is t
    assert pick_tensor((None, [t])) is t
    assert pick_tensor("nothing") is None


def test_to_features_shapes_and_seeded_cap():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, T, D)
    assert to_features(x).shape == (10, 3)
    img = torch.randn(2, 4, 3, 3)  # (B, C, H, W)
    f = to_features(img)
    assert f.shape == (18, 4)
    assert torch.equal(f[1], img[0, :, 0, 1])  # channels are features, positions samples
    assert to_features(img, conv="flatten").shape == (2, 36)
    big = torch.randn(1000, 6)
    a, b = to_features(big, max_rows=100, seed=3), to_features(big, max_rows=100, seed=3)
    assert a.shape == (100, 6) and torch.equal(a, b)
    assert not torch.equal(a, to_features(big, max_rows=100, seed=4))
    with pytest.raises(ValueError, match="'conv' parameter of to_features"):
        to_features(img, conv="pool")


def test_capture_records_and_removes_hooks_even_when_forward_raises():
    m = Net()
    before = count_hooks(m)
    with capture(m, ["encoder.0", "head"]) as cap:
        assert count_hooks(m) == before + 2 and cap.armed
        m(torch.randn(3, 4))
        assert cap.outputs["encoder.0"].shape == (3, 8)
        assert not cap.outputs["head"].requires_grad
    assert count_hooks(m) == before and not cap.armed
    with pytest.raises(RuntimeError):
        with capture(m, "head"):
            m(torch.randn(3, 5))  # wrong width: the forward raises
    assert count_hooks(m) == before


def test_clone_protects_against_inplace_ops():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    with capture(m, "0", clone=True) as cap:
        m(torch.randn(50, 4) * 10)
    assert (cap.outputs["0"] < 0).any()  # the pre-activation survives the in-place ReLU
