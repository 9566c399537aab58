"""ONNX Runtime's fused recurrent kernels as a benchmark baseline beside torch.nn.

ONNX Runtime (``pip install onnxruntime``) is the other widely deployed CPU engine with its
own LSTM, GRU and RNN kernels (the ONNX operators of those names, weights pre-packed for MLAS
when the session is created). This module builds ONNX graphs that compute exactly what a
torch.nn module computes, from that module's weights, and wraps them in sessions:

- :func:`sequence_session`: a stacked unidirectional LSTM / GRU / RNN over a whole sequence
  ``x [T, B, I] -> y [T, B, H]`` (zero initial state), as ``module(x)[0]``;
- :func:`decode_session`: one decoding step of embedding -> stacked LSTM / GRU / RNN -> linear
  head, ``(tokens [B], h [L, B, H], c [L, B, H]) -> (logits [B, V], h', c')`` (no ``c`` for
  GRU / RNN), as stepping the torch modules with the carried state.

Weight layouts (ONNX operator specs): LSTM gates are ordered i, o, f, c (torch: i, f, g, o);
GRU gates z, r, h (torch: r, z, n), with ``linear_before_reset=1``, which is torch's GRU (the
reset gate multiplies ``W_hn h + b_hn``). ``B`` is ``[b_ih | b_hh]`` in the operator's order.
Projections (``proj_size``), bidirectional and batch_first modules are not built (not
benchmarked).

The graphs are built with ``onnx.helper`` rather than ``torch.onnx.export`` so that they are
exactly these operators whatever the exporter version does. Tests check both sessions against
torch.nn (tests/test_bench_onnxrt.py).
"""

from __future__ import annotations

import numpy as np
import torch

# The operators' gate blocks as indices of torch.nn's gate blocks.
_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}
_OPSET = 17


# The oldest releases the graphs were checked with (opset 17 needs onnxruntime >= 1.13;
# session.force_spinning_stop is older still).
MIN_VERSIONS = {"onnxruntime": (1, 16), "onnx": (1, 14)}


def _version(module) -> tuple[int, ...]:
    parts = []
    for piece in module.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def unavailable_reason() -> str | None:
    """None when ``onnx`` (graph building) and ``onnxruntime`` import in versions new enough,
    else what is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        return f"{err.name} is not installed"
    for module in (onnxruntime, onnx):
        need = MIN_VERSIONS[module.__name__]
        if _version(module) < need:
            return (
                f"{module.__name__} {module.__version__} is older than {'.'.join(map(str, need))}"
            )
    return None


def available() -> bool:
    """True when the baseline can run (see :func:`unavailable_reason`)."""
    return unavailable_reason() is None


def install_hint() -> str:
    """Why the baseline is missing and how to get it."""
    return (
        f"{unavailable_reason() or 'installed'}: the ONNX Runtime baseline needs "
        "`pip install 'onnxruntime>=1.16' 'onnx>=1.14'` (or rnnkern's dev extra)"
    )


def _mode(rnn: torch.nn.RNNBase) -> str:
    if not isinstance(rnn, torch.nn.RNNBase):
        raise TypeError(f"rnn must be a torch.nn.LSTM, GRU or RNN, got {type(rnn).__name__}")
    if rnn.bidirectional or rnn.batch_first or getattr(rnn, "proj_size", 0):
        raise ValueError(
            "rnn must be unidirectional, batch_first=False and without proj_size for the "
            f"ONNX Runtime baseline, got {rnn}"
        )
    return rnn.mode


def _reorder(w: torch.Tensor, mode: str, H: int) -> np.ndarray:
    """Gate blocks of ``w [G*H, ...]`` (or ``[G*H]``) from torch's order to the operator's."""
    blocks = [w[g * H : (g + 1) * H] for g in _GATE_ORDER[mode]]
    return torch.cat(blocks).detach().to(torch.float32).cpu().numpy()


def _layer_node(rnn, l: int, x: str, h0: str, c0: str, prefix: str, inits: list) -> tuple:
    """One recurrent node for layer ``l``: appends its weights to ``inits`` and returns
    ``(node, y, y_h, y_c)`` output names (``y_c`` is None except for the LSTM)."""
    from onnx import helper, numpy_helper

    mode, H = rnn.mode, rnn.hidden_size
    w_ih = getattr(rnn, f"weight_ih_l{l}")
    w_hh = getattr(rnn, f"weight_hh_l{l}")
    names = [f"{prefix}W{l}", f"{prefix}R{l}", f"{prefix}B{l}"]
    inits.append(numpy_helper.from_array(_reorder(w_ih, mode, H)[None], names[0]))
    inits.append(numpy_helper.from_array(_reorder(w_hh, mode, H)[None], names[1]))
    if rnn.bias:
        b_ih = _reorder(getattr(rnn, f"bias_ih_l{l}"), mode, H)
        b_hh = _reorder(getattr(rnn, f"bias_hh_l{l}"), mode, H)
    else:
        b_ih = b_hh = np.zeros(w_ih.shape[0], dtype=np.float32)
    inits.append(numpy_helper.from_array(np.concatenate([b_ih, b_hh])[None], names[2]))
    y, y_h, y_c = f"{prefix}y{l}", f"{prefix}yh{l}", f"{prefix}yc{l}" if mode == "LSTM" else None
    attrs = {"hidden_size": H, "direction": "forward"}
    if mode == "LSTM":
        op, inputs, outputs = "LSTM", [x, *names, "", h0, c0], [y, y_h, y_c]
    elif mode == "GRU":
        op, inputs, outputs = "GRU", [x, *names, "", h0], [y, y_h]
        attrs["linear_before_reset"] = 1
    else:
        op, inputs, outputs = "RNN", [x, *names, "", h0], [y, y_h]
        attrs["activations"] = ["Tanh" if mode == "RNN_TANH" else "Relu"]
    return helper.make_node(op, inputs, outputs, name=f"{prefix}{op}{l}", **attrs), y, y_h, y_c


def _session(graph, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # opset 17's minimum: any onnxruntime that runs opset 17 reads it
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # the same thread count as torch's, for a fair run
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The pool spins while a run executes and stops when it returns. By default its workers
    # keep spinning after run() returns (about 40 ms of CPU time per run, measured with
    # os.times() across an idle pause), on the cores the next implementation timed then
    # shares: on a 2-core x86-64, rnnkern's fp32 decoder took 341-350 us/token right after an
    # ONNX Runtime run against 173 alone. With the spinning stopped it is unaffected (174),
    # and ONNX Runtime's own decoding step costs 4% more (260 vs 250 us/token alone).
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _squeeze_axis(name: str, axis_name: str, out: str):
    from onnx import helper

    return helper.make_node("Squeeze", [name, axis_name], [out])


def sequence_session(rnn: torch.nn.RNNBase, threads: int | None = None):
    """A session computing ``rnn(x)[0]`` for ``x [T, B, I]`` float32 (input ``"x"``, output
    ``"y" [T, B, H]``), zero initial state, ``threads`` intra-op threads (torch's count)."""
    from onnx import TensorProto, helper, numpy_helper

    _mode(rnn)
    inits = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    nodes = []
    x = "x"
    for l in range(rnn.num_layers):
        node, y, _, _ = _layer_node(rnn, l, x, "", "", "", inits)
        nodes.append(node)
        x = f"seq{l}"
        nodes.append(_squeeze_axis(y, "axis1", x))  # [T, 1, B, H] -> [T, B, H]
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "rnnkern_sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", rnn.input_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "B", rnn.hidden_size])],
        inits,
    )
    return _session(graph, threads or torch.get_num_threads())


def decode_session(
    rnn: torch.nn.RNNBase,
    embedding: torch.nn.Embedding,
    head: torch.nn.Linear,
    threads: int | None = None,
):
    """A session for one decoding step: inputs ``tokens`` int64 ``[B]``, ``h`` float32
    ``[L, B, H]`` (and ``c`` for the LSTM); outputs ``logits [B, V]``, ``h_out`` (and
    ``c_out``), the state after the step."""
    from onnx import TensorProto, helper, numpy_helper

    mode = _mode(rnn)
    L, H = rnn.num_layers, rnn.hidden_size
    lstm = mode == "LSTM"
    arr = lambda t: t.detach().to(torch.float32).cpu().numpy()  # noqa: E731
    inits = [
        numpy_helper.from_array(arr(embedding.weight), "emb"),
        numpy_helper.from_array(arr(head.weight), "head_w"),
        numpy_helper.from_array(
            arr(head.bias) if head.bias is not None else np.zeros(head.out_features, np.float32),
            "head_b",
        ),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
    ]
    for l in range(L + 1):
        inits.append(numpy_helper.from_array(np.array([l], dtype=np.int64), f"i{l}"))
    nodes = [
        helper.make_node("Gather", ["emb", "tokens"], ["x2d"]),  # [B, E]
        helper.make_node("Unsqueeze", ["x2d", "axis0"], ["x_in"]),  # [1, B, E]
    ]
    x, hs, cs = "x_in", [], []
    for l in range(L):
        # State slices [1, B, H] of layer l.
        nodes.append(helper.make_node("Slice", ["h", f"i{l}", f"i{l + 1}", "axis0"], [f"h{l}"]))
        if lstm:
            nodes.append(helper.make_node("Slice", ["c", f"i{l}", f"i{l + 1}", "axis0"], [f"c{l}"]))
        node, _, y_h, y_c = _layer_node(rnn, l, x, f"h{l}", f"c{l}" if lstm else "", "", inits)
        nodes.append(node)
        hs.append(y_h)
        cs.append(y_c)
        x = y_h  # [1, B, H]: the next layer's one-step input sequence
    nodes.append(helper.make_node("Concat", hs, ["h_out"], axis=0))
    if lstm:
        nodes.append(helper.make_node("Concat", cs, ["c_out"], axis=0))
    nodes.append(_squeeze_axis(hs[-1], "axis0", "top"))  # [B, H]
    nodes.append(helper.make_node("Gemm", ["top", "head_w", "head_b"], ["logits"], transB=1))
    state = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [L, "B", H])  # noqa: E731
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B"]), state("h")]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", head.out_features]),
        state("h_out"),
    ]
    if lstm:
        inputs.append(state("c"))
        outputs.append(state("c_out"))
    graph = helper.make_graph(nodes, "rnnkern_decode", inputs, outputs, inits)
    return _session(graph, threads or torch.get_num_threads())
