"""rnnkern.LSTM / GRU / RNN and cells against torch.nn: same init, outputs, states, gradients.

Each case builds the torch.nn module and the rnnkern module from the same seed (so the
initialisation itself is compared), runs the same input, and back-propagates the same random
upstream gradient through every output. Compared: outputs, final states, and the gradients of
the input, the initial states and every parameter.

Tolerances. float64: both sides compute the same formulas in a different order; the rounding
error of a float64 LSTM over these sizes stays under 1e-13, so 1e-10 is still thousands of
times smaller than any real mistake (a wrong gate or a missing term changes values at 1e-2).
float32: torch.nn (oneDNN on CPU) and rnnkern's state accumulation both round to float32
(eps 1.2e-7); over T <= 12 steps, sums of H <= 100 terms and a backward pass the observed
differences are below 1e-5, so rtol 1e-4 / atol 2e-5.
"""

import random
import zlib

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnkern

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
}

KINDS = {
    "LSTM": (rnnkern.LSTM, torch.nn.LSTM),
    "GRU": (rnnkern.GRU, torch.nn.GRU),
    "RNN": (rnnkern.RNN, torch.nn.RNN),
}


def _random_cases(n: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        kind = ["LSTM", "GRU", "RNN"][i % 3]
        H = rng.choice([1, 2, 7, 33, 100] if i % 5 else [1, 33])
        case = dict(
            kind=kind,
            input_size=rng.choice([1, 3, 10]),
            hidden_size=H,
            num_layers=rng.choice([1, 2, 3]),
            bias=rng.random() < 0.75,
            batch_first=rng.random() < 0.5,
            bidirectional=rng.random() < 0.5,
            proj_size=(
                rng.randint(1, H - 1) if kind == "LSTM" and H > 1 and rng.random() < 0.4 else 0
            ),
            nonlinearity=rng.choice(["tanh", "relu"]) if kind == "RNN" else None,
            T=rng.choice([1, 2, 5, 12]),
            B=rng.choice([1, 2, 4]),
            input_kind=rng.choice(
                ["batched", "batched", "unbatched", "packed_sorted", "packed_unsorted"]
            ),
            give_state=rng.random() < 0.6,
            dtype=torch.float64 if i % 2 == 0 else torch.float32,
        )
        cases.append(case)
    return cases


CASES = _random_cases(72, seed=20261125)


def _ids(case):
    return (
        f"{case['kind']}-I{case['input_size']}-H{case['hidden_size']}-L{case['num_layers']}"
        f"-p{case['proj_size']}-{'bi' if case['bidirectional'] else 'uni'}"
        f"-{'bias' if case['bias'] else 'nobias'}-{'bf' if case['batch_first'] else 'tf'}"
        f"-{case['nonlinearity'] or ''}-T{case['T']}-B{case['B']}-{case['input_kind']}"
        f"-{'hx' if case['give_state'] else 'nohx'}-{str(case['dtype'])[6:]}"
    )


def make_pair(case, backend="reference", dropout=0.0, device="cpu"):
    ours_cls, torch_cls = KINDS[case["kind"]]
    kw = dict(
        num_layers=case["num_layers"],
        bias=case["bias"],
        batch_first=case["batch_first"],
        dropout=dropout,
        bidirectional=case["bidirectional"],
        dtype=case["dtype"],
    )
    if case["kind"] == "LSTM":
        kw["proj_size"] = case["proj_size"]
    if case["kind"] == "RNN":
        kw["nonlinearity"] = case["nonlinearity"]
    torch.manual_seed(1234)
    theirs = torch_cls(case["input_size"], case["hidden_size"], **kw).to(device)
    torch.manual_seed(1234)
    ours = ours_cls(case["input_size"], case["hidden_size"], backend=backend, **kw).to(device)
    return ours, theirs


def make_input(case, gen, device="cpu"):
    inp, B, batched = _make_input_cpu(case, gen)
    if device == "cpu":
        return inp, B, batched
    if hasattr(inp, "batch_sizes"):
        return inp.to(device), B, batched
    return inp.to(device), B, batched


def _make_input_cpu(case, gen):
    T, B, I, dt = case["T"], case["B"], case["input_size"], case["dtype"]
    kind = case["input_kind"]
    if kind == "unbatched":
        return torch.randn(T, I, generator=gen, dtype=dt), 1, False
    if kind.startswith("packed"):
        lengths = [T] + [int(torch.randint(1, T + 1, (1,), generator=gen)) for _ in range(B - 1)]
        seqs = [torch.randn(n, I, generator=gen, dtype=dt) for n in lengths]
        if kind == "packed_sorted":
            seqs.sort(key=len, reverse=True)
            return pack_sequence(seqs, enforce_sorted=True), B, True
        return pack_sequence(seqs, enforce_sorted=False), B, True
    shape = (B, T, I) if case["batch_first"] else (T, B, I)
    return torch.randn(*shape, generator=gen, dtype=dt), B, True


def make_state(case, B, batched, gen, device="cpu"):
    D = 2 if case["bidirectional"] else 1
    H, P = case["hidden_size"], case["proj_size"] or case["hidden_size"]
    L = case["num_layers"]
    dt = case["dtype"]

    def r(*shape):
        t = torch.randn(*shape, generator=gen, dtype=dt).to(device)
        return t if batched else t.squeeze(1)

    h = r(L * D, B, P)
    if case["kind"] == "LSTM":
        return (h, r(L * D, B, H))
    return h


def _leaves(inp, state):
    data = inp.data if hasattr(inp, "batch_sizes") else inp
    states = () if state is None else (state if isinstance(state, tuple) else (state,))
    return [data, *states]


def _flatten(out):
    y, h = out
    y = y.data if hasattr(y, "batch_sizes") else y
    return [y, *(h if isinstance(h, tuple) else (h,))]


def run_and_grad(module, inp, state, grads_out):
    """Forward, backward with the given upstream gradients; returns outputs and gradients."""
    for leaf in _leaves(inp, state):
        leaf.grad = None
    module.zero_grad()
    outs = _flatten(module(inp, state) if state is not None else module(inp))
    if grads_out is None:
        return outs, None
    loss = sum((o * g).sum() for o, g in zip(outs, grads_out, strict=True))
    loss.backward()
    grads = [leaf.grad for leaf in _leaves(inp, state)]
    grads += [p.grad for p in module.parameters()]
    return outs, grads


def _clone_leaf(t):
    return t.detach().clone().requires_grad_(True)


def _clone_input(inp):
    if hasattr(inp, "batch_sizes"):
        return type(inp)(
            _clone_leaf(inp.data), inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices
        )
    return _clone_leaf(inp)


def _clone_state(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_clone_leaf(s) for s in state)
    return _clone_leaf(state)


def check_case(case, backend="reference", train=False, dropout=0.0, device="cpu"):
    gen = torch.Generator().manual_seed(zlib.crc32(_ids(case).encode()))
    ours, theirs = make_pair(case, backend, dropout, device)
    ours.train(train)
    theirs.train(train)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), f"init differs at {n1}"
    inp, B, batched = make_input(case, gen, device)
    state = make_state(case, B, batched, gen, device) if case["give_state"] else None
    inp_a, inp_b = _clone_input(inp), _clone_input(inp)
    st_a, st_b = _clone_state(state), _clone_state(state)
    outs_b, _ = run_and_grad(theirs, inp_b, st_b, None)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in outs_b]
    outs_b, grads_b = run_and_grad(theirs, inp_b, st_b, grads_out)
    outs_a, grads_a = run_and_grad(ours, inp_a, st_a, grads_out)
    tol = TOL[case["dtype"]]
    for a, b in zip(outs_a, outs_b, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    names = ["input", "h_0", "c_0"][: len(_leaves(inp, state))]
    names += [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_a, grads_b, strict=True):
        assert (a is None) == (b is None), name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    if hasattr(inp, "batch_sizes"):
        y_a, y_b = ours(inp_a)[0], theirs(inp_b)[0]
        assert torch.equal(y_a.batch_sizes, y_b.batch_sizes)
        for field in ("sorted_indices", "unsorted_indices"):
            fa, fb = getattr(y_a, field), getattr(y_b, field)
            assert (fa is None and fb is None) or torch.equal(fa, fb)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_module_matches_torch_nn(case):
    check_case(case)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("case", CASES[::3], ids=_ids)
def test_module_matches_cudnn_on_cuda(case):
    """The same comparison on the GPU, where torch.nn runs cuDNN (TF32 off: see conftest).
    Training mode, because cuDNN refuses RNN backward in eval mode (dropout is 0, so the mode
    changes nothing else)."""
    check_case(case, device="cuda", train=True)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dropout_one_in_training_matches_torch(kind):
    """With p=1 dropout is deterministic (every inter-layer activation zeroed), so even in
    training mode both implementations must agree exactly up to rounding."""
    case = dict(
        CASES[0],
        kind=kind,
        num_layers=3,
        proj_size=0,
        nonlinearity="tanh",
        input_kind="batched",
        dtype=torch.float64,
        T=4,
        B=2,
        hidden_size=5,
    )
    check_case(case, train=True, dropout=1.0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = rnnkern.LSTM(4, 8, num_layers=2, dropout=0.5, backend="reference")
    x = torch.randn(6, 3, 4)
    m.eval()
    y1, _ = m(x)
    y2, _ = m(x)
    assert torch.equal(y1, y2)
    m.train()
    y3, _ = m(x)
    y4, _ = m(x)
    assert not torch.allclose(y3, y4)
    assert not torch.allclose(y3, y1)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch_nn(kind, dtype, batched, bias):
    kw = dict(bias=bias, dtype=dtype)
    if kind == "RNNCell":
        kw["nonlinearity"] = "relu" if bias else "tanh"
    torch.manual_seed(5)
    theirs = getattr(torch.nn, kind)(6, 33, **kw)
    torch.manual_seed(5)
    ours = getattr(rnnkern, kind)(6, 33, backend="reference", **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    gen = torch.Generator().manual_seed(9)
    shape = (4, 6) if batched else (6,)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    hshape = (4, 33) if batched else (33,)
    n_states = 2 if kind == "LSTMCell" else 1
    states = [torch.randn(*hshape, generator=gen, dtype=dtype) for _ in range(n_states)]
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        si = [s.clone().requires_grad_(True) for s in states]
        out = module(xi, tuple(si) if n_states == 2 else si[0])
        outs = out if isinstance(out, tuple) else (out,)
        gens = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gens, dtype=dtype)).sum() for o in outs)
        loss.backward()
        results.append(
            [*outs, xi.grad, *(s.grad for s in si), *(p.grad for p in module.parameters())]
        )
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_rnn_cell_nonlinearity_is_read_at_every_call(backend):
    """torch.nn.RNNCell reads its nonlinearity attribute at every call, so changing it after
    construction changes what the cell computes; rnnkern's cell had kept the one it was built
    with (while its repr showed the new one)."""
    theirs = torch.nn.RNNCell(4, 5)
    ours = rnnkern.RNNCell(4, 5, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4)
    for nonlinearity in ("relu", "tanh"):
        theirs.nonlinearity = ours.nonlinearity = nonlinearity
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    ours.nonlinearity = "sigmoid"
    with pytest.raises(ValueError, match="nonlinearity 'sigmoid'"):
        ours(x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_state_dict_round_trip_both_ways(kind):
    ours_cls, torch_cls = KINDS[kind]
    kw = dict(num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kw["proj_size"] = 3
    theirs = torch_cls(5, 7, **kw)
    ours = ours_cls(5, 7, **kw)
    ours.load_state_dict(theirs.state_dict())
    for (n1, p1), (n2, p2) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    fresh = torch_cls(5, 7, **kw)
    torch.nn.init.zeros_(fresh.weight_ih_l0)
    ours2 = ours_cls(5, 7, **kw)
    fresh.load_state_dict(ours2.state_dict())
    for n, p in ours2.state_dict().items():
        assert torch.equal(fresh.state_dict()[n], p)


def test_eval_mode_backward_works():
    """cuDNN refuses RNN backward in eval mode; rnnkern's op does not."""
    m = rnnkern.GRU(3, 4, backend="reference").eval()
    x = torch.randn(5, 2, 3, requires_grad=True)
    y, h = m(x)
    (y.sum() + h.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_module_to_double_and_repr():
    m = rnnkern.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True).double()
    assert m.weight_hr_l1_reverse.dtype == torch.float64
    r = repr(m)
    t = repr(torch.nn.LSTM(3, 4, num_layers=2, proj_size=2, bidirectional=True))
    assert r == t
    assert len(m.all_weights) == 4 and len(m.all_weights[0]) == 5


def test_repr_says_what_the_module_computes():
    # torch.nn's RNN computes with the nonlinearity it was built with, whatever the attribute
    # says later; the repr follows what is computed. Cells name a chosen backend, as the
    # sequence modules do.
    m = rnnkern.RNN(3, 4, backend="reference")
    m.nonlinearity = "relu"
    x = torch.randn(2, 1, 3)
    assert repr(m) == "RNN(3, 4, backend='reference')"
    tanh = rnnkern.RNN(3, 4, backend="reference")
    tanh.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], tanh(x)[0])
    assert repr(rnnkern.RNN(3, 4, nonlinearity="relu")) == "RNN(3, 4, nonlinearity='relu')"
    assert repr(rnnkern.GRUCell(3, 4, backend="cpu")) == "GRUCell(3, 4, backend='cpu')"
    assert repr(rnnkern.RNNCell(3, 4, nonlinearity="relu")) == repr(
        torch.nn.RNNCell(3, 4, nonlinearity="relu")
    )


@needs_cuda
def test_cudnn_path_gets_flattened_weights():
    """cuDNN copies and warns about weights that are not one contiguous buffer; rnnkern's
    modules flatten them as torch.nn's do (on construction on the GPU and on .to/.cuda)."""
    import warnings

    for module in (
        rnnkern.LSTM(8, 16, num_layers=2, bidirectional=True, backend="torch").cuda(),
        rnnkern.GRU(8, 16, device="cuda", backend="torch"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            module(torch.randn(5, 3, 8, device="cuda"))
