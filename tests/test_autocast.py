"""rnnkern's modules under ``torch.autocast``, as torch.nn's behave there.

torch casts some recurrent ops to the autocast dtype and not others, and which ones depends on the
device, the op and the call (on the CPU the oneDNN LSTM and the Elman RNNs and RNNCell run in
bfloat16, the GRU, the LSTM/GRU cells and the LSTMs oneDNN does not run in float32; on CUDA, by
torch's autocast lists, the cuDNN RNNs and the cells in float16: the GPU run of these tests compares
with torch there). rnnkern asks torch (a two-unit probe module, once) and runs its kernels in that
dtype with autocast off inside. So:

- every output (y, h_n, c_n; a cell's h, c) has torch.nn's dtype, for every backend, with the
  structures and inputs that decide torch's path (projection, layers and directions, a
  PackedSequence of equal or unequal lengths);
- on a kernel backend the values are exactly those of the same module and inputs cast to the
  dtype torch runs in (bit for bit: the same casts, then the same kernels), each output then
  in torch.nn's dtype;
- gradients reach the float32 parameters as float32;
- the input / state dtype checks that reject mixed dtypes outside autocast let them through
  inside it, as torch.nn's do.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern

SEQUENCE = ("LSTM", "GRU", "RNN")
CELLS = ("LSTMCell", "GRUCell", "RNNCell")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backends(device: str) -> list[str]:
    return ["auto"] + [b for b in rnnkern.available_backends(device) if b != "torch"]


def _outputs(out) -> list[torch.Tensor]:
    """Every tensor a module call returned, flattened (y, h_n, c_n / h, c; a PackedSequence's
    data)."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for o in out:
        flat += _outputs(o)
    return flat


def _call(module, x, hx=None):
    return _outputs(module(x) if hx is None else module(x, hx))


def _pair(kind: str, device: str, backend: str, **kwargs):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(8, 16, **kwargs).to(device)
    ours = getattr(rnnkern, kind)(8, 16, backend=backend, **kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _input(kind: str, device: str) -> torch.Tensor:
    shape = (3, 8) if kind.endswith("Cell") else (5, 3, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16)


# The structures that decide torch's path, and so its casts (on the CPU, oneDNN runs the LSTM
# but not a projected one, nor one over a PackedSequence of unequal lengths; a projected LSTM
# returns c_n in float32 beside a bfloat16 y and h_n).
STRUCTURES = {
    "LSTM": [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 4}],
    "GRU": [{}, {"num_layers": 2, "bidirectional": True}],
    "RNN": [{"nonlinearity": "relu", "bias": False}],
}
INPUTS = ("tensor", "packed, equal lengths", "packed, unequal lengths")


def _sequence_input(how: str, device: str):
    x = _input("LSTM", device)  # [5, 3, 8]
    if how == "tensor":
        return x
    lengths = [5, 5, 5] if how == "packed, equal lengths" else [2, 5, 3]
    return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", INPUTS)
@pytest.mark.parametrize("kind", SEQUENCE)
def test_outputs_have_torch_nn_dtypes(kind, how, device):
    for kwargs in STRUCTURES[kind]:
        for backend in _backends(device):
            ref, ours = _pair(kind, device, backend, **kwargs)
            x = _sequence_input(how, device)
            with _autocast(device):
                want = [t.dtype for t in _call(ref, x)]
                got = [t.dtype for t in _call(ours, x)]
            assert got == want, (kwargs, backend, got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", CELLS)
def test_cell_outputs_have_torch_nn_dtypes(kind, device):
    for backend in _backends(device):
        ref, ours = _pair(kind, device, backend)
        x = _input(kind, device)
        with _autocast(device):
            want = [t.dtype for t in _call(ref, x)]
            got = [t.dtype for t in _call(ours, x)]
        assert got == want, (backend, got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", SEQUENCE + CELLS)
def test_kernel_values_are_those_of_the_cast_call(kind, device):
    for backend in _backends(device):
        if backend == "auto":
            continue  # (auto may pick torch.nn's path, which autocast drives itself)
        ref, ours = _pair(kind, device, backend)
        x = _input(kind, device)
        with _autocast(device):
            got = _call(ours, x)
            dtypes = [t.dtype for t in _call(ref, x)]  # the first: the one torch.nn runs in
        cast = getattr(rnnkern, kind)(8, 16, backend=backend).to(device, dtypes[0])
        cast.load_state_dict(ours.state_dict())  # (copies the values in the module's dtype)
        want = [t.to(d) for t, d in zip(_call(cast, x.to(dtypes[0])), dtypes, strict=True)]
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), (backend, dtypes)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell"])
def test_gradients_reach_float32_parameters(kind):
    for backend in _backends("cpu"):
        _, ours = _pair(kind, "cpu", backend)
        x = _input(kind, "cpu").requires_grad_()
        with _autocast("cpu"):
            loss = sum(t.float().sum() for t in _call(ours, x))
        loss.backward()
        assert x.grad is not None and x.grad.dtype == torch.float32
        for name, p in ours.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, (backend, name)
            assert torch.isfinite(p.grad).all(), (backend, name)


def test_mixed_dtype_states_pass_inside_autocast_only():
    _, ours = _pair("LSTM", "cpu", "reference")
    x = _input("LSTM", "cpu")
    hx = (torch.zeros(1, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="h_0 dtype must be torch.float32 like the input"):
        ours(x, hx)
    with _autocast("cpu"):
        y, (h, c) = ours(x, hx)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16  # (as torch.nn's oneDNN LSTM)
    with pytest.raises(ValueError, match="input dtype"):
        ours(x.double())
    with _autocast("cpu"):
        ours(x.double())  # torch.nn casts under autocast, and so does rnnkern


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_compiled_fullgraph_under_autocast_equals_eager(kind):
    # The probe builds a torch.nn module, which dynamo cannot trace: under torch.compile it runs
    # once at trace time (assume_constant_result) and the graph does not break.
    import rnnkern.nn as rnn_nn

    rnn_nn._AUTOCAST_DTYPES.clear()  # so the first (compiled) call runs the probe while tracing
    torch._dynamo.reset()
    backend = "cpu" if "cpu" in rnnkern.available_backends("cpu") else "reference"
    _, ours = _pair(kind, "cpu", backend)
    x = _input(kind, "cpu")
    compiled = torch.compile(ours, fullgraph=True)
    with _autocast("cpu"):
        got = _call(compiled, x)
        want = _call(ours, x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_device_types_without_autocast_run_as_before():
    # "meta" tensors (shape inference) have no autocast to ask about: modules and cells run.
    m = rnnkern.LSTM(8, 16, backend="reference").to("meta")
    y, (h, c) = m(torch.empty(5, 3, 8, device="meta"))
    assert y.shape == (5, 3, 16) and h.shape == c.shape == (1, 3, 16) and y.is_meta
    cell = rnnkern.GRUCell(8, 16, backend="reference").to("meta")
    assert cell(torch.empty(3, 8, device="meta")).shape == (3, 16)


def test_explain_says_the_autocast_dtype():
    _, ours = _pair("LSTM", "cpu", "reference")
    x = _input("LSTM", "cpu")
    assert "autocast" not in rnnkern.explain(ours, x)
    with _autocast("cpu"):
        text = rnnkern.explain(ours, x)
    assert "under autocast: runs in torch.bfloat16, as torch.nn would" in text, text


def _run_or_error(module, x):
    try:
        return [t.dtype for t in _call(module, x)], None
    except RuntimeError as err:
        return None, err


@pytest.mark.parametrize("how", INPUTS)
@pytest.mark.parametrize("kind", SEQUENCE + CELLS)
def test_float16_autocast_on_the_cpu(kind, how):
    # torch.nn.LSTM fails under CPU float16 autocast where oneDNN has no float16 LSTM primitive
    # (most CPUs: "could not create a primitive descriptor"); the others run. rnnkern's kernels
    # run every call in what torch.nn returns (bfloat16's answer, in float16, where it fails),
    # auto does not choose torch.nn's path where it fails, and backend="torch" says why.
    if kind.endswith("Cell") and how != "tensor":
        pytest.skip("cells take tensors only")
    structures = [{}] if kind.endswith("Cell") else STRUCTURES[kind]
    for kwargs in structures:
        ref, _ = _pair(kind, "cpu", "reference", **kwargs)
        x = _input(kind, "cpu") if kind.endswith("Cell") else _sequence_input(how, "cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            want, failure = _run_or_error(ref, x)
        if failure is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                as_bf16 = [t.dtype for t in _call(ref, x)]
            want = [torch.float16 if d == torch.bfloat16 else d for d in as_bf16]
        for backend in _backends("cpu") + ["torch"]:
            _, ours = _pair(kind, "cpu", backend, **kwargs)
            with torch.autocast("cpu", dtype=torch.float16):
                if failure is not None and backend == "torch":
                    with pytest.raises(
                        rnnkern.BackendUnavailableError, match="fails under float16 autocast"
                    ):
                        _call(ours, x)
                    continue
                got = [t.dtype for t in _call(ours, x)]
                chosen = ours.choose_backend(x).backend
            assert got == want, (kwargs, backend, got, want)
            if failure is not None:
                assert chosen != "torch", (kwargs, backend)


def test_float16_autocast_values_and_gradients_where_torch_nn_fails():
    # The LSTM: torch.nn fails here (on CPUs with a float16 oneDNN LSTM it runs, and the
    # dtype test above covers that case); rnnkern runs the module cast to float16, bit for bit,
    # and gradients reach the float32 parameters.
    ref, _ = _pair("LSTM", "cpu", "reference")
    x = _input("LSTM", "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        if _run_or_error(ref, x)[1] is None:
            pytest.skip("this CPU's oneDNN has a float16 LSTM: torch.nn runs it")
    for backend in _backends("cpu"):
        _, ours = _pair("LSTM", "cpu", backend)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            got = _call(ours, xg)
        kernel = "cpu" if backend == "auto" else backend
        cast = rnnkern.LSTM(8, 16, backend=kernel).to(torch.float16)
        cast.load_state_dict(ours.state_dict())
        want = _call(cast, x.to(torch.float16))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == torch.float16 and torch.equal(g, w), backend
        sum(t.float().sum() for t in got).backward()
        assert xg.grad is not None and xg.grad.dtype == torch.float32
        for name, p in ours.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, (backend, name)
            assert torch.isfinite(p.grad).all(), (backend, name)
