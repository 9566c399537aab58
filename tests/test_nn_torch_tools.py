"""The modules under torch's tools and at torch.nn's edges: empty batches, ``torch.jit.trace``
(with its check), ``torch.export``, ``torch.jit.script`` (refused, clearly), torch.func's
transforms, and a gradient differentiated again.

Results are compared bit for bit: the traced graph calls the same operators on the same data
as the eager call, and an empty batch has no arithmetic at all.
"""

import io

import pytest
import torch

import rnnkern
from rnnkern import dispatch
from rnnkern.backends import BackendUnavailableError
from rnnkern.backends import cpu as cpu_backend
from rnnkern.functional import DOUBLE_BACKWARD_ERROR

pytestmark = pytest.mark.host_only

needs_cpu_kernels = pytest.mark.skipif(
    cpu_backend._cpu is None, reason="rnnkern._cpu is not built: " + cpu_backend.build_hint()
)
# The kernel backends whose operators a trace records ("torch" is torch.nn's own op).
KERNEL_BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpu_kernels)]
SEQUENCE = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
CELLS = {"LSTMCell": torch.nn.LSTMCell, "GRUCell": torch.nn.GRUCell, "RNNCell": torch.nn.RNNCell}


def _pair(kind: str, backend: str, **kw):
    theirs = {**SEQUENCE, **CELLS}[kind](5, 6, **kw)
    ours = getattr(rnnkern, kind)(5, 6, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _tensors(item)]


# ------------------------------------------------------------------------------ empty batch


@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", SEQUENCE)
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_torch_nn_outputs(kind, backend, batch_first):
    """torch.nn returns empty outputs and states for a batch of 0 rows (with and without an
    initial state), and backward through them gives zero gradients; so does rnnkern, whatever
    backend was asked for."""
    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    if kind == "LSTM":
        kw["proj_size"] = 3
    ours, theirs = _pair(kind, backend, **kw)
    x = torch.randn((0, 4, 5) if batch_first else (4, 0, 5))
    states = [torch.zeros(4, 0, 3 if kind == "LSTM" else 6)]
    if kind == "LSTM":
        states.append(torch.zeros(4, 0, 6))
    hx = tuple(states) if kind == "LSTM" else states[0]
    for args in ((x,), (x, hx)):
        got, want = _tensors(ours(*args)), _tensors(theirs(*args))
        assert [(t.shape, t.dtype, t.requires_grad) for t in got] == [
            (t.shape, t.dtype, t.requires_grad) for t in want
        ]
        sum(t.sum() for t in got).backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours.parameters())
    assert "empty batch" in rnnkern.explain(ours, x)


@pytest.mark.parametrize("kind", CELLS)
def test_empty_batch_cells(kind):
    ours, theirs = _pair(kind, "reference")
    x = torch.randn(0, 5)
    got, want = _tensors(ours(x)), _tensors(theirs(x))
    assert [(t.shape, t.requires_grad) for t in got] == [(t.shape, t.requires_grad) for t in want]


def test_empty_sequence_still_an_error():
    """torch.nn refuses T = 0 ("Expected sequence length to be larger than 0"); so do we, and
    the message names the time dimension, which batch_first moves."""
    with pytest.raises(ValueError, match=r"at least one time step \(dimension 1\).*\[3, 0, 5\]"):
        rnnkern.GRU(5, 6, batch_first=True)(torch.randn(3, 0, 5))


# ------------------------------------------------------------------------------- jit.trace


def _saved_and_loaded(obj, save, load):
    buffer = io.BytesIO()
    save(obj, buffer)
    buffer.seek(0)
    return load(buffer)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", [*SEQUENCE, "GRUCell"])
def test_jit_trace_checks_and_equals_eager(kind, backend):
    """torch.jit.trace re-traces under no_grad to check its graph (the default, check_trace);
    a graph that depended on grad mode failed that check. The traced module, saved and
    loaded again, gives the eager outputs, and trains: its gradients are the eager ones."""
    kw = {} if kind.endswith("Cell") else dict(num_layers=2)
    ours, _ = _pair(kind, backend, **kw)
    x = torch.randn(3, 5) if kind.endswith("Cell") else torch.randn(7, 3, 5)
    traced = torch.jit.trace(ours, (x,))
    loaded = _saved_and_loaded(traced, torch.jit.save, torch.jit.load)
    want = _tensors(ours(x))
    sum(t.sum() for t in want).backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    for module in (traced, loaded):
        got = _tensors(module(x))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(_tensors(module(x)), want, strict=True))
    sum(t.sum() for t in _tensors(traced(x))).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(ours.parameters(), grads, strict=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_torch_export_equals_eager(kind, backend):
    """torch.export captures the modules' operators (no graph break: rnnkern's layer is one
    operator), and the program, saved and loaded again, gives the eager outputs."""
    kw = {} if kind.endswith("Cell") else dict(num_layers=2, proj_size=3)
    ours, _ = _pair(kind, backend, **kw)
    x = torch.randn(3, 5) if kind.endswith("Cell") else torch.randn(7, 3, 5)
    program = torch.export.export(ours, (x,))
    loaded = _saved_and_loaded(program, torch.export.save, torch.export.load)
    want = _tensors(ours(x))
    for module in (program.module(), loaded.module()):
        assert all(torch.equal(a, b) for a, b in zip(_tensors(module(x)), want, strict=True))


# ------------------------------------------------------------------------------ jit.script


class _Tagger(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind", [*SEQUENCE, *CELLS])
def test_jit_script_refused_with_what_works(kind):
    """TorchScript cannot compile the Python dispatch of a forward: torch.jit.script says so,
    names what works instead, and leaves the caller's model as it was."""
    module = getattr(rnnkern, kind)(5, 6)
    refusal = f"cannot compile rnnkern.{kind}.*convert.model, to='torch'"
    with pytest.raises(RuntimeError, match=refusal):
        torch.jit.script(module)
    model = _Tagger(module)
    with pytest.raises(RuntimeError, match=f"rnnkern.{kind}.*torch.jit.trace, torch.export"):
        torch.jit.script(model)
    assert model.rnn is module


# ------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", SEQUENCE)
def test_double_backward_is_a_clear_error(kind, backend):
    """A gradient penalty differentiates a gradient again. The layer's backward has no
    derivative, so that is an error saying so; create_graph=True alone still gives the
    gradient, the same as without it."""
    ours, _ = _pair(kind, backend)
    x = torch.randn(7, 3, 5, requires_grad=True)
    (plain,) = torch.autograd.grad(ours(x)[0].sum(), x)
    (grad,) = torch.autograd.grad(ours(x)[0].sum(), x, create_graph=True)
    assert torch.equal(grad, plain) and grad.requires_grad
    with pytest.raises(RuntimeError) as raised:
        grad.square().sum().backward()
    assert str(raised.value) == DOUBLE_BACKWARD_ERROR


def test_double_backward_through_backend_torch():
    """The error's advice holds: backend 'torch' on the CPU differentiates the gradient again,
    as torch.nn does, with torch.nn's numbers."""
    ours, theirs = _pair("LSTM", "torch")
    x = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    ours.double(), theirs.double()
    for module in (ours, theirs):
        (grad,) = torch.autograd.grad(module(x)[0].sum(), x, create_graph=True)
        grad.square().sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNNCell"])
def test_torch_func_grad_runs_torch_nn_path(kind):
    """torch.func.grad (and jacrev) cannot run rnnkern's operators (their autograd formula has
    no separate setup_context, see rnnkern.torch_ops); under them ``auto`` runs torch.nn's
    path, so functional_call + grad gives torch.nn's gradients exactly (the same operator)."""
    kw = {} if kind.endswith("Cell") else dict(num_layers=2)
    ours, theirs = _pair(kind, "auto", **kw)
    x = torch.randn(3, 5) if kind.endswith("Cell") else torch.randn(7, 3, 5)

    def loss(params, module):
        out = torch.func.functional_call(module, params, (x,))
        return _tensors(out)[0].square().sum()

    params = {name: p.detach() for name, p in ours.named_parameters()}
    got = torch.func.grad(loss)(params, ours)
    want = torch.func.grad(loss)(params, theirs)
    assert all(torch.equal(got[name], want[name]) for name in params)
    jac = torch.func.jacrev(lambda a: _tensors(ours(a))[0])(x)
    assert torch.equal(jac, torch.func.jacrev(lambda a: _tensors(theirs(a))[0])(x))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_func_grad_with_a_named_kernel_backend_is_a_clear_error(backend):
    ours, _ = _pair("GRU", backend)
    with pytest.raises(BackendUnavailableError, match=f"'{backend}' cannot run .* grad transform"):
        torch.func.grad(lambda a: ours(a)[0].sum())(torch.randn(7, 3, 5))


@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (auto's "slower than torch.nn" notice)
def test_vmap_runs(kind, backend):
    """torch.nn's sequence modules have no vmap batching rule (nn.LSTM under vmap raises), its
    cells do. rnnkern's operators run under vmap (torch calls them once per mapped entry), and
    ``auto`` takes them for the sequence modules: the result equals the loop over the entries.
    Not bit for bit: under vmap the input projection is one batched GEMM, and the loop may take
    torch.nn's path (auto); in float64 the two orders of the same sums (at most 6 terms, 7
    steps) differ by a few 1e-16, so 1e-12."""
    ours, theirs = _pair(kind, backend)
    ours.double(), theirs.double()
    shape = (4, 3, 5) if kind.endswith("Cell") else (4, 7, 3, 5)
    xs = torch.randn(shape, dtype=torch.float64)
    mapped = torch.vmap(lambda a: _tensors(ours(a))[0])(xs)
    looped = torch.stack([_tensors(ours(a))[0] for a in xs])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-12)
    if kind.endswith("Cell"):
        theirs_mapped = torch.vmap(lambda a: _tensors(theirs(a))[0])(xs)
        torch.testing.assert_close(mapped, theirs_mapped, rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(RuntimeError, match="[Bb]atching rule"):
            torch.vmap(lambda a: _tensors(theirs(a))[0])(xs)


def test_dispatch_under_transforms():
    config = rnnkern.backends.base.LayerConfig(
        "lstm", "cpu", torch.float32, 5, 6, 0, 3, 7, False, True
    )
    assert dispatch.functorch_transforms() == ""
    seen = []
    torch.vmap(torch.func.grad(lambda a: seen.append(dispatch.functorch_transforms()) or a.sum()))(
        torch.randn(2, 3)
    )
    assert seen == ["vmap,grad"]
    choice = dispatch.choose("auto", config, True, transforms="vmap,grad")
    assert choice.backend == "torch" and "grad transform" in choice.reason
    with pytest.raises(BackendUnavailableError, match="'reference' cannot run .* jvp transform"):
        dispatch.choose("reference", config, True, transforms="jvp")
    with pytest.raises(BackendUnavailableError, match="'torch' cannot run .* torch.func.vmap"):
        dispatch.choose("torch", config, True, transforms="vmap")
    assert dispatch.choose("reference", config, True, transforms="vmap").backend == "reference"


# --------------------------------------------------------------------------- parametrizations


class _Counted(torch.nn.Module):
    """A deterministic parametrization that counts its evaluations."""

    calls = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        _Counted.calls += 1
        return 0.5 * w + 0.1


@pytest.mark.parametrize("backend", ["auto", "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "RNNCell"])
def test_parametrized_weights_are_computed_once_a_call(kind, backend):
    """torch.nn.utils.parametrize on the weights: the same outputs and gradients as torch.nn's
    module with the same parametrization, and each parametrized weight computed once a call
    (a stateful parametrization, e.g. spectral_norm in training mode, advances once a call;
    torch.nn's sequence modules compute each four times in torch 2.13, its cells once)."""
    from torch.nn.utils import parametrize

    ours, theirs = _pair(kind, backend)
    names = ["weight_hh", "bias_ih"] if kind.endswith("Cell") else ["weight_hh_l0", "bias_ih_l0"]
    for module in (ours, theirs):
        for name in names:
            parametrize.register_parametrization(module, name, _Counted())
    x = torch.randn(3, 5) if kind.endswith("Cell") else torch.randn(4, 3, 5)
    want = _tensors(theirs(x))
    _Counted.calls = 0
    got = _tensors(ours(x))
    assert _Counted.calls == len(names), _Counted.calls
    for g, w in zip(got, want, strict=True):
        # float32, other kernels than torch.nn's: outputs in (-1, 1) from sums of 6 products a
        # step, a few units of float32 rounding (6e-8) each; gradients summed over 4 steps x 3
        # rows of such terms
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in want).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)
