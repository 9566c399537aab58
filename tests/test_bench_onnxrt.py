"""The ONNX Runtime baseline computes what the torch.nn modules compute (else the benchmark
would compare different work)."""

import copy

import numpy as np
import pytest
import torch
from tolerances import assert_within_float32_error

from rnnkern.bench import onnxrt

pytestmark = pytest.mark.host_only  # nothing here needs a GPU (gpu_check.sh leaves it out)

pytest.importorskip("onnxruntime", reason="the ONNX Runtime baseline needs onnxruntime")
pytest.importorskip("onnx", reason="the ONNX Runtime baseline builds graphs with onnx")

CELLS = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]


def _module(mode: str, I: int, H: int, layers: int, bias: bool = True) -> torch.nn.RNNBase:
    if mode.startswith("RNN"):
        nonlinearity = mode[4:].lower()
        return torch.nn.RNN(I, H, num_layers=layers, nonlinearity=nonlinearity, bias=bias)
    return getattr(torch.nn, mode)(I, H, num_layers=layers, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", CELLS)
def test_sequence_session_matches_torch_nn(mode, bias):
    torch.manual_seed(0)
    rnn = _module(mode, 12, 20, 2, bias)
    x = torch.randn(9, 3, 12)
    got = onnxrt.sequence_session(rnn, threads=1).run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = rnn(x)[0]
        gold = copy.deepcopy(rnn).double()(x.double())[0]
    assert_within_float32_error(torch.from_numpy(got), gold, ref, f"{mode} y")


@pytest.mark.parametrize("mode", CELLS)
def test_decode_session_matches_stepping_torch_nn(mode):
    torch.manual_seed(1)
    L, H, V = 3, 16, 23
    rnn = _module(mode, 8, H, L)
    emb, head = torch.nn.Embedding(V, 8), torch.nn.Linear(H, V)
    session = onnxrt.decode_session(rnn, emb, head, threads=1)
    modules64 = [copy.deepcopy(m).double() for m in (rnn, emb, head)]
    lstm = mode == "LSTM"
    h = np.zeros((L, 2, H), np.float32)
    c = np.zeros((L, 2, H), np.float32)
    tokens = torch.tensor([3, 17])
    state = state64 = None
    for step in range(4):
        feeds = {"tokens": tokens.numpy(), "h": h} | ({"c": c} if lstm else {})
        logits, h, *rest = session.run(None, feeds)
        with torch.no_grad():
            out, state = rnn(emb(tokens).unsqueeze(0), state)
            out64, state64 = modules64[0](modules64[1](tokens).unsqueeze(0), state64)
            ref, gold = head(out[0]), modules64[2](out64[0])
        assert_within_float32_error(torch.from_numpy(logits), gold, ref, f"{mode} step {step}")
        h_ref, h_gold = (state[0], state64[0]) if lstm else (state, state64)
        assert_within_float32_error(torch.from_numpy(h), h_gold, h_ref, f"{mode} h {step}")
        if lstm:
            c = rest[0]
            assert_within_float32_error(torch.from_numpy(c), state64[1], state[1], "c")
        tokens = (tokens * 5 + 2) % V


@pytest.mark.parametrize(
    "kw", [dict(bidirectional=True), dict(batch_first=True), dict(proj_size=4)]
)
def test_unsupported_modules_are_rejected(kw):
    rnn = torch.nn.LSTM(5, 6, **kw)
    with pytest.raises(ValueError, match="rnn must be unidirectional"):
        onnxrt.sequence_session(rnn)


def test_not_a_recurrent_module_is_rejected():
    with pytest.raises(TypeError, match="rnn must be a torch.nn.LSTM, GRU or RNN"):
        onnxrt.sequence_session(torch.nn.Linear(3, 4))


def test_old_or_missing_versions_are_reported(monkeypatch):
    import onnxruntime

    assert onnxrt.unavailable_reason() is None
    monkeypatch.setattr(onnxruntime, "__version__", "1.12.0")
    assert onnxrt.unavailable_reason() == "onnxruntime 1.12.0 is older than 1.16"
    assert not onnxrt.available()
    assert "onnxruntime 1.12.0 is older than 1.16: the ONNX Runtime baseline needs" in (
        onnxrt.install_hint()
    )
