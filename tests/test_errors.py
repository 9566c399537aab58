"""Bad arguments and inputs raise errors that name the argument, what was expected and what came.

rnnkern rejects at least everything torch.nn rejects: each case first checks that torch.nn
raises too (or documents where rnnkern is stricter).
"""

import pytest
import torch

import rnnkern
from rnnkern.functional import rnn_layer

pytestmark = pytest.mark.host_only  # nothing here needs a GPU (gpu_check.sh leaves it out)

CTOR_CASES = [
    # (kwargs, exception, words the message must contain)
    (dict(input_size=0, hidden_size=4), ValueError, ["input_size", "greater than zero", "0"]),
    (dict(input_size=3, hidden_size=-2), ValueError, ["hidden_size", "-2"]),
    (dict(input_size=3, hidden_size=4, num_layers=0), ValueError, ["num_layers", "0"]),
    (dict(input_size=3.0, hidden_size=4), TypeError, ["input_size", "int", "float"]),
    (dict(input_size=3, hidden_size=4, dropout=1.5), ValueError, ["dropout", "[0, 1]", "1.5"]),
    (dict(input_size=3, hidden_size=4, dropout=-0.1), ValueError, ["dropout", "-0.1"]),
    (dict(input_size=3, hidden_size=4, dropout=True), ValueError, ["dropout", "True"]),
    (dict(input_size=3, hidden_size=4, bias=1), TypeError, ["bias", "bool", "int"]),
    (dict(input_size=3, hidden_size=4, batch_first="yes"), TypeError, ["batch_first", "str"]),
    (dict(input_size=3, hidden_size=4, proj_size=4), ValueError, ["proj_size", "hidden_size", "4"]),
    (dict(input_size=3, hidden_size=4, proj_size=-1), ValueError, ["proj_size", "-1"]),
]


@pytest.mark.parametrize("kwargs,exc,words", CTOR_CASES)
def test_lstm_constructor_errors(kwargs, exc, words):
    with pytest.raises((ValueError, TypeError)):
        torch.nn.LSTM(**kwargs)
    with pytest.raises(exc) as info:
        rnnkern.LSTM(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_nonlinearity_and_backend():
    with pytest.raises(ValueError, match="nonlinearity.*'sigmoid'.*tanh.*relu"):
        rnnkern.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="nonlinearity.*'gelu'"):
        rnnkern.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(
        ValueError, match="backend must be 'auto' or one of .*'reference'.*got 'fast'"
    ):
        rnnkern.GRU(3, 4, backend="fast")


@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_proj_size_only_for_lstm(kind, proj_size):
    # torch.nn's GRU and RNN take the keyword to refuse it, whatever its value
    message = "proj_size argument is only supported for LSTM, not RNN or GRU"
    with pytest.raises(ValueError, match=message):
        getattr(torch.nn, kind)(3, 4, proj_size=proj_size)
    with pytest.raises(ValueError, match=message):
        getattr(rnnkern, kind)(3, 4, proj_size=proj_size)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "torch"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_of_zero_units_or_inputs(kind, backend):
    # torch.nn builds cells with 0 inputs or 0 units (a [B, 0] state); so does rnnkern
    for sizes in ((3, 0), (0, 4), (0, 0)):
        torch.manual_seed(0)
        theirs = getattr(torch.nn, kind)(*sizes)
        torch.manual_seed(0)
        ours = getattr(rnnkern, kind)(*sizes, backend=backend)
        x = torch.randn(2, sizes[0], requires_grad=True)
        got, want = ours(x), theirs(x)
        got, want = (got, want) if kind == "LSTMCell" else ((got,), (want,))
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape == (2, sizes[1])
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)  # float32, 0-4 products a unit
        sum(g.sum() for g in got).backward()
        assert x.grad is not None and x.grad.shape == x.shape
    assert isinstance(rnnkern.convert(getattr(torch.nn, kind)(3, 0)), getattr(rnnkern, kind))


@pytest.fixture
def lstm():
    return rnnkern.LSTM(3, 5, num_layers=2, backend="reference")


@pytest.fixture
def torch_lstm():
    return torch.nn.LSTM(3, 5, num_layers=2)


INPUT_CASES = [
    # (input, hx, words)
    (lambda: torch.randn(4, 2, 3, 1), None, ["input", "2-D", "3-D", "4-D"]),
    (lambda: torch.randn(3), None, ["input", "1-D"]),
    (lambda: torch.randn(4, 2, 6), None, ["input_size", "Expected 3", "got 6"]),
    (lambda: torch.randn(4, 2, 3, dtype=torch.float64), None, ["dtype", "float64", "float32"]),
    (lambda: torch.randn(4, 2, 3), lambda: (torch.zeros(2, 2, 5),), ["hx", "tuple", "length 1"]),
    (
        lambda: torch.randn(4, 2, 3),
        lambda: (torch.zeros(2, 3, 5), torch.zeros(2, 2, 5)),
        ["h_0", "[2, 2, 5]", "[2, 3, 5]"],
    ),
    (
        lambda: torch.randn(4, 2, 3),
        lambda: (torch.zeros(2, 2, 5), torch.zeros(2, 2, 4)),
        ["c_0", "[2, 2, 5]", "[2, 2, 4]"],
    ),
    (
        lambda: torch.randn(4, 2, 3),
        lambda: (torch.zeros(2, 5), torch.zeros(2, 2, 5)),
        ["h_0", "3-D", "2-D"],
    ),
    (
        lambda: torch.randn(4, 3),
        lambda: (torch.zeros(2, 1, 5), torch.zeros(2, 1, 5)),
        ["h_0", "2-D", "3-D"],
    ),
    (
        lambda: torch.randn(4, 2, 3),
        lambda: (torch.zeros(1, 2, 5), torch.zeros(2, 2, 5)),
        ["h_0", "[2, 2, 5]", "[1, 2, 5]"],
    ),
]


@pytest.mark.parametrize("make_input,make_hx,words", INPUT_CASES)
def test_forward_input_errors(lstm, torch_lstm, make_input, make_hx, words):
    x = make_input()
    hx = make_hx() if make_hx else None
    # torch.nn rejects each of these too (a 1-tuple hx crashes it with an IndexError).
    with pytest.raises((ValueError, RuntimeError, TypeError, IndexError)):
        torch_lstm(x, hx)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as info:
        lstm(x, hx)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_state_dtype_must_match_input(lstm):
    x = torch.randn(4, 2, 3)
    hx = (torch.zeros(2, 2, 5, dtype=torch.float64), torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="h_0 dtype must be torch.float32 .* got torch.float64"):
        lstm(x, hx)


def test_errors_are_value_and_runtime_errors(lstm):
    """torch.nn raises RuntimeError for some of these and ValueError for others; rnnkern's
    error is both, so callers' except clauses written for torch.nn keep working."""
    with pytest.raises(RuntimeError):
        lstm(torch.randn(4, 2, 7))
    with pytest.raises(ValueError):
        lstm(torch.randn(4, 2, 7))


def test_empty_sequence_rejected(lstm):
    with pytest.raises(ValueError, match="at least one time step.*\\[0, 2, 3\\]"):
        lstm(torch.randn(0, 2, 3))


def test_gru_hx_shape(lstm):
    gru = rnnkern.GRU(3, 5, backend="reference")
    with pytest.raises(ValueError, match=r"h_0 size \[1, 2, 5\], got \[1, 2, 4\]"):
        gru(torch.randn(4, 2, 3), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("cls", [rnnkern.LSTMCell, rnnkern.GRUCell, rnnkern.RNNCell])
def test_cell_errors(cls):
    cell = cls(3, 4, backend="reference")
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match="input_size: got 5 expected 3"):
        cell(torch.randn(2, 5))
    hx = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"shape \[2, 4\], got \[3, 4\]"):
        cell(torch.randn(2, 3), (hx, hx) if cls is rnnkern.LSTMCell else hx)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "torch"])
@pytest.mark.parametrize("kind", ["GRU", "GRUCell"])
def test_every_weight_is_checked(backend, kind):
    """A weight other than the first on another device (a meta weight left by a conversion or
    a load with assign=True) or in another dtype is refused, naming it: the kernels read
    weights by address and returned garbage for both."""
    cell = kind.endswith("Cell")
    name = "weight_hh" if cell else "weight_hh_l0"
    x = torch.randn(2, 4) if cell else torch.randn(5, 2, 4)
    for device, dtype, words in (
        ("meta", torch.float32, [name, "meta", "cpu"]),
        ("cpu", torch.float64, [name, "torch.float64", "torch.float32"]),
    ):
        module = getattr(rnnkern, kind)(4, 5, backend=backend)
        weight = getattr(module, name).detach().to(device=device, dtype=dtype)
        setattr(module, name, torch.nn.Parameter(weight))
        with pytest.raises(rnnkern.RNNInputError) as info:
            module(x)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


# Every weight of a module, by kind: (constructor kwargs, input shape).
WEIGHT_KINDS = {
    "LSTM": (dict(num_layers=2, bidirectional=True), (5, 2, 4)),
    "LSTM-proj": (dict(proj_size=3), (5, 2, 4)),
    "GRU": ({}, (5, 2, 4)),
    "RNN": (dict(nonlinearity="relu"), (5, 2, 4)),
    "LSTMCell": ({}, (2, 4)),
    "GRUCell": ({}, (2, 4)),
    "RNNCell": ({}, (2, 4)),
}


def _weight_module(kind: str, backend: str):
    kwargs, shape = WEIGHT_KINDS[kind]
    module = getattr(rnnkern, kind.split("-")[0])(4, 6, backend=backend, **kwargs)
    return module, torch.randn(shape)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "torch"])
@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_replaced_weights_of_another_shape_are_refused(backend, kind):
    """A weight replaced after construction by one of another shape is refused, naming it and
    both shapes. The kernels take the sizes from the module: backend cpu read a wider
    weight_hh past its rows and returned outputs of its width, and a one-element bias (which
    torch.nn's ops broadcast) as if it had every gate's."""
    module, x = _weight_module(kind, backend)
    for name, weight in list(module.named_parameters()):
        shapes = [
            [*weight.shape[:-1], weight.shape[-1] + 1],
            [weight.shape[0] - 1, *weight.shape[1:]],
            [1] if weight.dim() == 1 else [weight.numel()],  # (a bias torch.nn broadcasts)
        ]
        for shape in shapes:
            module, x = _weight_module(kind, backend)
            setattr(module, name, torch.nn.Parameter(torch.randn(shape)))
            with pytest.raises(rnnkern.RNNInputError) as info:
                module(x)
            for word in (name, str(list(weight.shape)), str(shape)):
                assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "torch"])
@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_a_bias_set_to_none(backend, kind):
    """torch.nn's sequence modules raise a TypeError for a bias set to None after construction
    (backends reference and cpu ran without it); its cells run without it, and so do these."""
    module, x = _weight_module(kind, backend)
    name = "bias_hh" if kind.endswith("Cell") else "bias_hh_l0"
    setattr(module, name, None)
    if not kind.endswith("Cell"):
        gh = getattr(module, name.replace("bias", "weight")).shape[0]
        with pytest.raises(
            TypeError, match=f"{name} must be a Tensor of shape \\[{gh}\\], got None"
        ):
            module(x)
        return
    weightless, _ = _weight_module(kind, backend)
    weightless.weight_hh = None  # (only the biases may be None)
    with pytest.raises(TypeError, match="weight_hh must be a Tensor of shape .* got None"):
        weightless(x)
    want = getattr(torch.nn, kind)(4, 6)
    want.load_state_dict(module.state_dict(), strict=False)
    want.bias_hh = None
    with torch.no_grad():
        got, expected = module(x), want(x)
    for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, expected)), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_wrong_types_are_type_errors_too():
    """torch.nn raises a TypeError (or an AttributeError) for a state of the wrong type;
    rnnkern's error is also a TypeError, so except clauses written for it keep working."""
    x = torch.randn(2, 3)
    with pytest.raises(TypeError):
        torch.nn.LSTMCell(3, 4)(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        rnnkern.LSTMCell(3, 4)(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="must be a Tensor or PackedSequence, got list"):
        rnnkern.LSTM(3, 4)([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="h_0 must be a Tensor, got int"):
        rnnkern.GRU(3, 4)(torch.randn(5, 2, 3), 0)


def test_packed_data_must_be_2d():
    from torch.nn.utils.rnn import PackedSequence

    bad = PackedSequence(torch.randn(6, 2, 3), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"PackedSequence's data must be 2-D .* \[6, 2, 3\]"):
        rnnkern.GRU(3, 4)(bad)


def test_functional_errors():
    x = torch.randn(3, 2, 4)
    w_ih, w_hh = torch.randn(8, 4), torch.randn(8, 2)
    h0 = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="cell must be one of"):
        rnn_layer("lstmx", x, h0, None, w_ih, w_hh)
    with pytest.raises(ValueError, match=r"w_ih must have shape \[8, 4\], got \[8, 5\]"):
        rnn_layer("rnn_tanh", x, torch.zeros(2, 8), None, torch.randn(8, 5), torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"c0 must have shape \[2, 2\]"):
        rnn_layer("lstm", x, h0, torch.zeros(3, 2), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 3\], got values in \[0, 3\]"):
        rnn_layer("lstm", x, h0, torch.zeros(2, 2), w_ih, w_hh, lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="x must be a 3-D tensor"):
        rnn_layer("lstm", x[0], h0, torch.zeros(2, 2), w_ih, w_hh)
    # (a float64 state for float32 input was rounded silently; the modules refuse it)
    with pytest.raises(ValueError, match="h0 must have dtype torch.float32 .* got torch.float64"):
        rnn_layer("lstm", x, h0.double(), torch.zeros(2, 2), w_ih, w_hh)
    x16, w_ih16, w_hh16 = x.bfloat16(), w_ih.bfloat16(), w_hh.bfloat16()
    with pytest.raises(ValueError, match="c0 must have dtype torch.bfloat16 or torch.float32"):
        rnn_layer("lstm", x16, h0, torch.zeros(2, 2, dtype=torch.float16), w_ih16, w_hh16)


def test_backend_by_name_that_cannot_run_says_why():
    m = rnnkern.LSTM(3, 4, backend="cpu")
    x = torch.randn(2, 1, 3)
    if "cpu" in rnnkern.available_backends("cpu"):
        pytest.skip("the cpu backend is built here; covered by test_backend_cpu")
    with pytest.raises(rnnkern.BackendUnavailableError, match="backend 'cpu'"):
        m(x)


def test_explain_names_what_it_takes():
    with pytest.raises(TypeError, match="an rnnkern LSTM, GRU, RNN or cell, got LSTM"):
        rnnkern.explain(torch.nn.LSTM(3, 4), torch.randn(2, 1, 3))
