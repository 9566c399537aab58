"""torch.compile(fullgraph=True) through rnnkern modules, and backend selection rules."""

import dataclasses
import warnings

import pytest
import torch
from layer_cases import layer_config

import rnnkern
from rnnkern import dispatch


def _outputs(out):
    y, h = out
    return [y, *(h if isinstance(h, tuple) else (h,))]


COMPILE_BACKENDS = [
    "auto",
    "reference",
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            "cpu" not in rnnkern.available_backends("cpu"), reason="the C++ extension is not built"
        ),
    ),
]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_compile_fullgraph_forward_backward(kind, backend):
    torch.manual_seed(0)
    kw = dict(proj_size=3) if kind == "LSTM" else {}
    m = getattr(rnnkern, kind)(4, 6, num_layers=2, bidirectional=True, backend=backend, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 4, requires_grad=True)
    gens = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        outs_c = _outputs(compiled(x))
        # The backend the compiled graph ran: auto picks a per-layer kernel under compile.
        ran = dispatch.choose(backend, _config_of(m, x), True, compiling=True).backend
    upstream = [torch.randn(o.shape, generator=gens) for o in outs_c]
    sum((o * g).sum() for o, g in zip(outs_c, upstream, strict=True)).backward()
    grads_c = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    m.backend = ran
    outs_e = _outputs(m(x))
    sum((o * g).sum() for o, g in zip(outs_e, upstream, strict=True)).backward()
    grads_e = [x.grad] + [p.grad for p in m.parameters()]
    # The same op and backend eagerly and compiled: only the graph around the op differs
    # (aot_eager runs the same kernels), so the results agree to float32 rounding.
    for a, b in zip(outs_c + grads_c, outs_e + grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    "cpu" not in rnnkern.available_backends("cpu"), reason="the C++ extension is not built"
)
def test_compile_fullgraph_through_the_cpu_backends_own_gemm(monkeypatch):
    """At this size (40*8*128*384 = 15.7M multiply-adds per input projection) backend cpu
    runs the projection as the ``rnnkern::linear`` operator, which must trace without a graph
    break and give the eager values and gradients."""
    from rnnkern.backends import cpu as cpu_backend

    calls = []
    linear, linear_backward = cpu_backend.CPUBackend.linear, cpu_backend.CPUBackend.linear_backward
    monkeypatch.setattr(
        cpu_backend.CPUBackend, "linear", lambda *a: calls.append("fwd") or linear(*a)
    )
    monkeypatch.setattr(
        cpu_backend.CPUBackend,
        "linear_backward",
        lambda *a: calls.append("bwd") or linear_backward(*a),
    )
    torch.manual_seed(0)
    m = rnnkern.GRU(128, 128, num_layers=2, backend="cpu")
    x = torch.randn(40, 8, 128, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y_c, h_c = compiled(x)
    (y_c.square().sum() + h_c.sum()).backward()
    assert calls.count("fwd") == 2 and calls.count("bwd") == 2, calls
    grads_c = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    y_e, h_e = m(x)
    (y_e.square().sum() + h_e.sum()).backward()
    grads_e = [x.grad] + [p.grad for p in m.parameters()]
    # Same kernels eagerly and compiled (aot_eager): float32 rounding at most.
    for a, b in zip([y_c, h_c, *grads_c], [y_e, h_e, *grads_e], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_compile_fullgraph_when_sizes_change(kind, backend):
    """A new batch or sequence size makes torch.compile recompile with symbolic sizes
    (automatic dynamic shapes), which the backend choice may not take as arguments: with
    fullgraph=True the second size raised. Four sizes, one of them B = 1, forward and backward
    against the same backend eagerly (float32 rounding, as above)."""
    torch.manual_seed(0)
    m = getattr(rnnkern, kind)(4, 6, num_layers=2, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for T, B in ((5, 2), (7, 3), (4, 5), (6, 1)):
        x = torch.randn(T, B, 4, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            outs_c = _outputs(compiled(x))
            symbolic = dataclasses.replace(_config_of(m, x), batch_size=-1, seq_len=-1)
            ran = dispatch.choose(backend, symbolic, True, compiling=True).backend
        sum(o.sum() for o in outs_c).backward()
        grads_c = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
        x.grad = None
        m.zero_grad()
        eager = getattr(rnnkern, kind)(4, 6, num_layers=2, backend=ran)
        eager.load_state_dict(m.state_dict())
        outs_e = _outputs(eager(x))
        sum(o.sum() for o in outs_e).backward()
        grads_e = [x.grad] + [p.grad for p in eager.parameters()]
        x.grad = None
        for a, b in zip(outs_c + grads_c, outs_e + grads_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _config_of(module, x):
    return module._layer_config(x, x.shape[1], x.shape[0], False, [])


def test_auto_prefers_torch_path_when_no_kernel_is_faster(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": ()})
    choice = dispatch.choose("auto", layer_config(), training=True)
    assert choice.backend == "torch"


def test_auto_under_compile_without_kernel_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": ()})
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="slow 'reference' backend.*torch.compile"):
        choice = dispatch.choose("auto", layer_config(), training=True, compiling=True)
    assert choice.backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.choose("auto", layer_config(), training=True, compiling=True)


def test_eval_backward_on_cuda_avoids_cudnn(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cuda": ()})
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="eval mode"):
        choice = dispatch.choose("auto", layer_config(device_type="cuda"), training=False)
    assert choice.backend == "reference"


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("RNNKERN_BACKEND", "reference")
    assert dispatch.choose("torch", layer_config(), training=True).backend == "reference"
    monkeypatch.setenv("RNNKERN_BACKEND", "warp")
    with pytest.raises(ValueError, match="RNNKERN_BACKEND.*got 'warp'"):
        dispatch.choose("auto", layer_config(), training=True)


def test_environment_variable_reaches_module(monkeypatch):
    m = rnnkern.GRU(3, 4)
    x = torch.randn(2, 1, 3)
    monkeypatch.setenv("RNNKERN_BACKEND", "reference")
    assert "backend 'reference'" in rnnkern.explain(m, x)
    monkeypatch.setenv("RNNKERN_BACKEND", "torch")
    assert "backend 'torch'" in rnnkern.explain(m, x)


def test_torch_backend_by_name_under_compile_is_an_error():
    with pytest.raises(rnnkern.BackendUnavailableError, match="torch.compile"):
        dispatch.choose("torch", layer_config(), training=True, compiling=True)


def test_available_backends_lists_reference_and_torch():
    names = rnnkern.available_backends("cpu")
    assert "reference" in names and "torch" in names


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_named_backends_agree(backend):
    torch.manual_seed(3)
    m = rnnkern.LSTM(3, 5, num_layers=2, backend=backend)
    ref = rnnkern.LSTM(3, 5, num_layers=2, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 3)
    for a, b in zip(_outputs(m(x)), _outputs(ref(x)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _SlowKernel:
    """A stand-in backend that supports everything and is measured slower than torch.nn."""

    def supports(self, config):
        return True

    def faster_than_torch(self, config):
        return "measured 0.5x torch.nn"


def test_under_compile_a_slower_fused_kernel_beats_reference(monkeypatch):
    from rnnkern import backends

    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": ("slow",)})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(backends, "supports", lambda name, config: True)
    monkeypatch.setattr(backends, "get_backend", lambda name: _SlowKernel())
    assert dispatch.choose("auto", layer_config(), training=True).backend == "torch"
    with pytest.warns(
        RuntimeWarning, match="backend 'slow'.*not measured faster than torch.nn.*0.5x"
    ):
        choice = dispatch.choose("auto", layer_config(), training=True, compiling=True)
    assert choice.backend == "slow"


def test_symbolic_sizes_never_reach_supports(monkeypatch):
    """While compiling, select passes -1 for the sizes; backends' supports() must still get
    real ones (backend cuda caches its answer without B, and a plan for B = -1 is an error)."""
    seen = []
    real = dispatch.backends.supports

    def spy(name, config):
        seen.append((name, config.batch_size, config.seq_len))
        return real(name, config)

    monkeypatch.setattr(dispatch.backends, "supports", spy)
    symbolic = dataclasses.replace(layer_config(), batch_size=-1, seq_len=-1)
    for requested in ("auto", "reference"):
        choice = dispatch.choose(requested, symbolic, True, compiling=True)
        assert choice.backend != "torch"
    assert seen and all(b >= 1 and t >= 1 for _, b, t in seen)
    assert dispatch.SYMBOLIC_SIZES in dispatch.choose("auto", symbolic, True, True).reason
