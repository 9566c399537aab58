"""rnnkern.convert: torch.nn's recurrent modules inside a model swapped for rnnkern's, and back.

Outputs are compared in float64 with rtol/atol 1e-10, the bound tests/test_nn_parity.py
justifies for the same modules against torch.nn.
"""

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import rnnkern

pytestmark = pytest.mark.host_only


class Tagger(nn.Module):
    """Every kind, nested in the containers models use."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
        self.cells = nn.ModuleList([nn.LSTMCell(6, 6), nn.GRUCell(6, 6)])
        self.heads = nn.ModuleDict(
            {
                "gru": nn.GRU(6, 4, batch_first=True, bias=False),
                "rnn": nn.Sequential(nn.RNN(4, 4, nonlinearity="relu")),
            }
        )
        self.step = nn.RNNCell(4, 4, nonlinearity="relu")

    def forward(self, x):
        y, _ = self.encoder(x)
        h, _ = self.cells[0](y[-1])
        h = self.cells[1](h)
        z, _ = self.heads["gru"](h.unsqueeze(1))
        z, _ = self.heads["rnn"][0](z)
        return self.step(z[:, -1])


def _kinds(model: nn.Module) -> list[str]:
    return [f"{type(m).__module__.split('.')[0]}.{type(m).__name__}" for m in model.modules()]


def test_convert_swaps_every_kind_and_keeps_the_parameters():
    torch.manual_seed(0)
    model = Tagger().double().eval()
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    want = model(x)
    params = list(model.parameters())
    names = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert rnnkern.convert(model, backend="reference") is model
    assert _kinds(model) == [
        "test_convert.Tagger", "rnnkern.LSTM", "torch.ModuleList", "rnnkern.LSTMCell",
        "rnnkern.GRUCell", "torch.ModuleDict", "rnnkern.GRU", "torch.Sequential", "rnnkern.RNN",
        "rnnkern.RNNCell",
    ]  # fmt: skip
    assert all(m.backend == "reference" for m in model.modules() if hasattr(m, "backend"))
    assert not any(m.training for m in model.modules())
    # The same Parameter objects: nothing copied, the optimizer trains the new modules.
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == names
    assert model.heads["rnn"][0].nonlinearity == "relu" and model.step.nonlinearity == "relu"
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    model(x).square().sum().backward()
    before = model.encoder.weight_hh_l0.detach().clone()
    optimizer.step()
    assert not torch.equal(model.encoder.weight_hh_l0, before)

    rnnkern.convert(model, to="torch")
    assert all(k.startswith(("torch.", "test_convert.")) for k in _kinds(model))
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    scripted = torch.jit.script(model)  # what the way back is for
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_convert_a_module_itself(kind):
    theirs = getattr(nn, kind)(5, 6).double()
    ours = rnnkern.convert(theirs)
    assert type(ours) is getattr(rnnkern, kind) and type(theirs) is getattr(nn, kind)
    assert ours.backend == "auto"
    assert all(a is b for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    x = torch.randn((3, 5) if "Cell" in kind else (4, 3, 5), dtype=torch.float64)
    got, want = ours(x), theirs(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    back = rnnkern.convert(ours, to="torch")
    assert type(back) is getattr(nn, kind) and str(back) == str(theirs)


def test_convert_leaves_subclasses_and_other_modules_alone():
    class MyLSTM(nn.LSTM):  # (its forward may do more than torch.nn.LSTM's)
        pass

    model = nn.Sequential(nn.Linear(5, 5), MyLSTM(5, 6))
    with pytest.warns(UserWarning, match="left MyLSTM as it is: it subclasses torch.nn.*LSTM"):
        rnnkern.convert(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is MyLSTM


def test_convert_keeps_a_module_held_twice_one_module():
    model = nn.Module()
    model.a = model.b = nn.GRU(5, 6)
    model.seq = nn.Sequential(model.a)
    rnnkern.convert(model)
    assert type(model.a) is rnnkern.GRU and model.a is model.b is model.seq[0]
    rnnkern.convert(model, to="torch")
    assert type(model.a) is nn.GRU and model.a is model.b is model.seq[0]


def test_convert_keeps_load_state_dict_hooks_working():
    """A load_state_dict pre-hook holds its module through a weak reference: moved as it was,
    it pointed at the replaced module and, once that was freed, failed ("the hook of a dead
    Module"). It gets the new module; a module converted on its own keeps its own hooks."""
    import gc

    seen = []
    model = nn.Sequential(nn.LSTM(4, 8))
    model[0].register_load_state_dict_pre_hook(lambda m, *args: seen.append(type(m)))
    state = model.state_dict()
    rnnkern.convert(model)
    gc.collect()
    model.load_state_dict(state)
    assert seen == [rnnkern.LSTM]
    old = nn.GRU(4, 8)
    old.register_load_state_dict_pre_hook(lambda m, *args: seen.append(m))
    new = rnnkern.convert(old)
    seen.clear()
    old.load_state_dict(old.state_dict())
    new.load_state_dict(new.state_dict())
    assert seen[0] is old and seen[1] is new
    handle = new.register_forward_hook(lambda *args: None)
    assert not old._forward_hooks and len(new._forward_hooks) == 1  # copies, not shared
    handle.remove()


@pytest.mark.parametrize("to", ["rnnkern", "torch"])
def test_convert_moves_hooks_and_attributes(to):
    """Hooks registered on the old module fire on the new one, and their handles still remove
    them; attributes set after construction come along."""
    old = nn.LSTM(5, 6) if to == "rnnkern" else rnnkern.LSTM(5, 6)
    calls = []
    handles = [
        old.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m)))),
        old.register_forward_hook(lambda m, args, out: calls.append(("post", type(m)))),
        old.register_full_backward_hook(lambda m, gin, gout: calls.append(("back", type(m)))),
        old.register_state_dict_post_hook(lambda m, sd, prefix, local: sd.update(extra=1)),
    ]
    old.tag = "encoder"
    model = nn.Sequential(old)
    rnnkern.convert(model, to=to)  # (in a model: the same hook tables, handles still work)
    new = model[0]
    assert type(new) is not type(old) and new.tag == "encoder"
    x = torch.randn(3, 2, 5, requires_grad=True)
    new(x)[0].sum().backward()
    kind = type(new)
    assert calls == [("pre", kind), ("post", kind), ("back", kind)], calls
    assert new.state_dict()["extra"] == 1
    for handle in handles:
        handle.remove()
    calls.clear()
    new(x)[0].sum().backward()
    assert calls == [] and "extra" not in new.state_dict()


def test_convert_errors():
    with pytest.raises(ValueError, match="to must be 'rnnkern' or 'torch', got 'cudnn'"):
        rnnkern.convert(nn.LSTM(2, 3), to="cudnn")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got dict"):
        rnnkern.convert({})
    with pytest.raises(ValueError, match="backend applies to to='rnnkern' only"):
        rnnkern.convert(rnnkern.LSTM(2, 3), to="torch", backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        rnnkern.convert(nn.LSTM(2, 3), backend="fastest")
    model = nn.Sequential(nn.GRU(2, 3))
    nn.utils.parametrizations.weight_norm(model[0], "weight_hh_l0")
    with pytest.raises(ValueError, match="GRU has parametrizations .* convert the model before"):
        rnnkern.convert(model)


def test_convert_refuses_hook_reparametrizations():
    """torch.nn.utils.prune (and the old weight_norm) rename a weight, add a buffer and
    recompute the weight in a forward pre-hook; the swapped module would have run with its
    meta placeholder. After prune.remove the module converts and computes what it did."""
    gru = nn.GRU(4, 6)
    prune.l1_unstructured(gru, "weight_hh_l0", amount=0.5)
    with pytest.raises(ValueError, match=r"weight_hh_l0_orig.*buffers \['weight_hh_l0_mask'\]"):
        rnnkern.convert(gru)
    x = torch.randn(7, 2, 4)
    expected, _ = gru(x)
    prune.remove(gru, "weight_hh_l0")
    torch.testing.assert_close(rnnkern.convert(gru, backend="cpu")(x)[0], expected)


def test_convert_takes_every_cell_torch_builds():
    cell = nn.GRUCell(3, 4, bias=1)  # torch.nn takes any truthy bias for its cells
    x = torch.randn(2, 3)
    torch.testing.assert_close(rnnkern.convert(cell)(x), cell(x))


def test_convert_back_then_export_to_onnx():
    """The way to ONNX the README gives: torch.nn's classes back, then torch.onnx.export (its
    TorchScript-based exporter, which needs no onnxscript); ONNX Runtime runs the graph to
    float32 rounding of the same GRU (observed 1e-7; 1e-5 leaves a hundredfold margin, and a
    wrong gate or weight moves outputs by 1e-2)."""
    ort = pytest.importorskip("onnxruntime", reason="the dev extra installs onnxruntime")
    import io

    model = nn.Sequential(rnnkern.GRU(8, 16, num_layers=2))
    x = torch.randn(5, 2, 8)
    want = model[0](x)[0]
    rnnkern.convert(model, to="torch")
    buffer = io.BytesIO()
    torch.onnx.export(_FirstOutput(model[0]), (x,), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-5, atol=1e-5)


class _FirstOutput(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]
