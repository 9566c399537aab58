"""Fast decoding: ``rnnkern.Decoder`` packs a recurrent model once and steps B streams.

``Decoder(rnn, embedding=None, head=None, weights="fp32", batch_size=1, backend="cpu")`` takes
a unidirectional ``torch.nn`` or ``rnnkern`` LSTM / GRU / RNN (or one of their cells), an
optional ``nn.Embedding`` feeding layer 0 and an optional output ``nn.Linear`` head, reads
their weights by torch.nn's parameter names and packs copies of them once (changing the
modules afterwards does not change the Decoder: build a new one after further training):

- ``weights="fp32"`` keeps float32 matrices; ``weights="bf16"`` stores the matrices that are
  streamed every step (``W_hh``, ``W_ih`` of layers >= 1, ``W_hr``, the head) as bfloat16 and
  accumulates in float32, halving the bytes a step reads.
- With an embedding, layer 0's input projection becomes a table
  ``embedding.weight @ W_ih0ᵀ + b_ih0`` (float32, computed in float64), so a token costs one
  row lookup instead of a matrix-vector product.

``backend="cpu"`` runs each step (all layers and the head) as one C++ call and ``generate`` as
one C++ call for the whole loop, sampling with :mod:`rnnkern.sampling`'s rule; nothing is
allocated per token. ``backend="triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)
runs each step as one Triton launch (:mod:`rnnkern.backends.triton.decode`) and samples on the
device (:func:`rnnkern.sampling.sample_tensor`), so ``generate`` makes no host round trip per
token; on CUDA the tokens' sample-and-steps are replayed from captured CUDA graphs, several
tokens a replay.
``backend="cuda"`` (CUDA tensors, extension ``rnnkern._cuda``) runs ``generate`` as one
persistent kernel for all tokens (:mod:`rnnkern.backends.cuda_decode`): layers, head, sampling
by the C++ decoder's own rule code and the token feedback, with no launch per token.
``backend="torch"`` runs the same packed weights with torch ops (the reference backend's cell
formulas, one step at a time) on any device, for machines without the extension; it is never
chosen silently.

Legend: ``B`` streams, ``L`` layers, ``I`` input size, ``H`` hidden, ``P`` state size
(proj_size or H), ``G`` gates, ``V`` head outputs (vocabulary), ``S`` prime length.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import sampling
from .backends.base import CELL_CODES, GATES

__all__ = ["Decoder"]

_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
BACKENDS = ("cpu", "triton", "cuda", "torch")  # Decoder(backend=...)


def _cell_of_module(rnn: torch.nn.Module) -> tuple[str, int, bool]:
    """(cell name, layers, is a single-step cell module) of a supported recurrent module."""
    mode = getattr(rnn, "mode", None)
    if isinstance(mode, str) and mode in _MODES and hasattr(rnn, "weight_hh_l0"):
        if getattr(rnn, "bidirectional", False):
            raise ValueError(
                "rnn must be unidirectional (a decoder steps forward in time), "
                "got bidirectional=True"
            )
        return _MODES[mode], int(rnn.num_layers), False
    if hasattr(rnn, "weight_hh") and hasattr(rnn, "weight_ih"):
        name = type(rnn).__name__
        if name.startswith("LSTM"):
            return "lstm", 1, True
        if name.startswith("GRU"):
            return "gru", 1, True
        if name.startswith("RNN"):
            nonlinearity = getattr(rnn, "nonlinearity", "tanh")
            return ("rnn_tanh" if nonlinearity == "tanh" else "rnn_relu"), 1, True
    raise ValueError(
        "rnn must be a torch.nn or rnnkern LSTM, GRU or RNN (or LSTMCell, GRUCell, RNNCell), "
        f"got {type(rnn).__name__}"
    )


def _layer_params(rnn, l: int, is_cell: bool) -> tuple[Tensor, ...]:
    """(W_ih, W_hh, b_ih, b_hh, W_hr) of layer ``l`` by torch.nn's parameter names."""
    if is_cell:
        return rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh, None
    get = lambda name: getattr(rnn, f"{name}_l{l}", None)  # noqa: E731
    return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")


class Decoder:
    """Packed weights and the state of ``B`` streams of a recurrent model, for generation.

    Args:
        rnn: unidirectional LSTM / GRU / RNN (torch.nn or rnnkern), or LSTMCell / GRUCell /
            RNNCell.
        embedding: optional ``nn.Embedding`` (``embedding_dim == input_size``) mapping token
            ids to layer 0's input.
        head: optional ``nn.Linear`` (``in_features == P``) producing logits ``[B, V]``.
        weights: ``"fp32"`` or ``"bf16"`` storage of the streamed matrices.
        batch_size: number of streams ``B`` (change it with :meth:`reset`).
        backend: ``"cpu"`` (C++ kernels, CPU tensors), ``"triton"`` (one Triton launch per
            step, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``"cuda"`` (one
            CUDA launch per ``generate`` call, CUDA tensors) or ``"torch"`` (torch ops, any
            device).
    """

    def __init__(
        self,
        rnn: torch.nn.Module,
        embedding: torch.nn.Embedding | None = None,
        head: torch.nn.Linear | None = None,
        weights: str = "fp32",
        batch_size: int = 1,
        backend: str = "cpu",
    ) -> None:
        if weights not in ("fp32", "bf16"):
            raise ValueError(f"weights must be 'fp32' or 'bf16', got {weights!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'cpu', 'triton', 'cuda' or 'torch', got {backend!r}")
        cell, L, is_cell = _cell_of_module(rnn)
        first = _layer_params(rnn, 0, is_cell)
        device = first[1].device
        self._triton = None
        # backend "triton" on CUDA: replay each token's sample-and-step from a CUDA graph
        # (RNNKERN_DECODE_CUDA_GRAPH=0 or setting this False runs every launch eagerly).
        self.cuda_graphs = _cuda_graphs_enabled()
        # ... and how many tokens one replay runs: 1, or an even number (a replay then ends on
        # the state parity it began with). A replay costs the host a Python call and a graph
        # launch, some microseconds, which a graph of 8 tokens pays once for 8; where the host
        # is slower than the GPU's token that is the token rate (gpu_decode's row "a graph per
        # token" measures what it saves).
        self.graph_tokens = 8
        # backend "triton": sample each token with one Triton launch (vocabularies up to 1024);
        # False samples with the rule in torch ops (to measure what the launch saves).
        self.fused_sampling = True
        if backend == "triton":
            self._triton = _triton_decode_module(device)
        self._cuda = None
        if backend == "cuda":
            from .backends import cuda_decode

            reason = cuda_decode.unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"Decoder(backend='cuda'): {reason}")
        if backend == "cpu":
            from .backends import cpu as cpu_backend

            if cpu_backend._cpu is None:
                raise RuntimeError(cpu_backend.build_hint() + "; or pass backend='torch'")
            if device.type != "cpu":
                raise ValueError(
                    f"backend 'cpu' needs the model on the CPU, got {device}; "
                    "use backend='torch' for other devices"
                )
            self._cpu = cpu_backend._cpu
        else:
            self._cpu = None
        self.cell, self.num_layers, self.backend, self.weights = cell, L, backend, weights
        self.device = device
        G = GATES[cell]
        self.hidden_size = first[1].shape[0] // G
        self.state_size = P = first[1].shape[1]
        self.input_size = I = first[0].shape[1]

        if embedding is not None:
            if not isinstance(embedding, torch.nn.Embedding):
                raise ValueError(f"embedding must be an nn.Embedding, got {type(embedding)}")
            if embedding.embedding_dim != I:
                raise ValueError(
                    f"embedding.embedding_dim must equal the rnn's input_size {I}, "
                    f"got {embedding.embedding_dim}"
                )
            if embedding.max_norm is not None:
                raise ValueError("embedding.max_norm is not supported (it rewrites weights)")
        if head is not None:
            if not isinstance(head, torch.nn.Linear):
                raise ValueError(f"head must be an nn.Linear, got {type(head)}")
            if head.in_features != P:
                raise ValueError(
                    f"head.in_features must equal the rnn's output size {P}, got {head.in_features}"
                )
        self.vocab_in = embedding.num_embeddings if embedding is not None else 0
        self.vocab_size = head.out_features if head is not None else 0

        f32 = dict(dtype=torch.float32, device=device)
        stream_dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        with torch.no_grad():
            # Copies, always (copy=True): a weight already in the packed dtype and layout was
            # shared with the module before, so training it further changed some of what
            # the Decoder ran (biases, and on backend torch most matrices) and not the rest.
            def packed(t: Tensor | None) -> Tensor | None:
                return None if t is None else t.detach().to(stream_dtype, copy=True).contiguous()

            def bias(t: Tensor | None) -> Tensor | None:
                return None if t is None else t.detach().to(**f32, copy=True).contiguous()

            self._layers = []
            for l in range(L):
                w_ih, w_hh, b_ih, b_hh, w_hr = _layer_params(rnn, l, is_cell)
                self._layers.append(
                    {
                        "w_ih": None if (l == 0 and embedding is not None) else packed(w_ih),
                        "w_hh": packed(w_hh),
                        "b_ih": bias(b_ih),
                        "b_hh": bias(b_hh),
                        "w_hr": packed(w_hr),
                    }
                )
            self._table = None
            if embedding is not None:
                w_ih0, _, b_ih0, _, _ = first
                table = embedding.weight.detach().double() @ w_ih0.detach().double().t()
                if b_ih0 is not None:
                    table += b_ih0.detach().double()
                self._table = table.to(**f32).contiguous()
            self._head_w = packed(head.weight) if head is not None else None
            self._head_b = bias(head.bias) if head is not None else None
            if self._triton is not None:
                self._stack_for_triton()
            if backend == "cuda":
                from .backends.cuda_decode import CudaDecode

                self._cuda = CudaDecode(
                    cell, self._layers, self._table, self._head_w, self._head_b, I,
                    self.hidden_size, P, device,
                )  # fmt: skip
        if batch_size is None:  # (reset(None) keeps the current count, which is not set yet)
            raise ValueError("batch_size must be an int >= 1, got None")
        self.reset(batch_size)

    def _stack_for_triton(self) -> None:
        """Stack the layers' matrices as the Triton step reads them ([L, GH, H] and friends,
        zeros for absent biases); the per-layer entries become views, so nothing is stored
        twice."""
        lay = self._layers
        GH = GATES[self.cell] * self.hidden_size
        f32 = dict(dtype=torch.float32, device=self.device)
        zeros = torch.zeros(GH, **f32)
        self._w_hh_all = torch.stack([d["w_hh"] for d in lay])
        upper = [d["w_ih"] for d in lay[1:]]
        self._w_ih_upper = torch.stack(upper) if upper else self._w_hh_all[:1].clone()
        self._b_ih_all = torch.stack([zeros if d["b_ih"] is None else d["b_ih"] for d in lay])
        self._b_hh_all = torch.stack([zeros if d["b_hh"] is None else d["b_hh"] for d in lay])
        self._w_hr_all = None
        if lay[0]["w_hr"] is not None:
            self._w_hr_all = torch.stack([d["w_hr"] for d in lay])
            for l, d in enumerate(lay):
                d["w_hr"] = self._w_hr_all[l]
        for l, d in enumerate(lay):
            d["w_hh"], d["b_ih"], d["b_hh"] = (
                self._w_hh_all[l],
                self._b_ih_all[l],
                self._b_hh_all[l],
            )
            if l >= 1:
                d["w_ih"] = self._w_ih_upper[l - 1]
        if self._head_w is not None and self._head_b is None:
            self._head_b = torch.zeros(self._head_w.shape[0], **f32)

    # ------------------------------------------------------------------------------ state
    def reset(self, batch_size: int | None = None) -> None:
        """Zero the state of every stream; with ``batch_size``, change the number of streams."""
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
                raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
            if batch_size < 1:
                raise ValueError(f"batch_size must be an int >= 1, got {batch_size}")
            self.batch_size = int(batch_size)
            self._allocate()
        for t in (self._h, self._c):
            if t is not None:
                t.zero_()

    def _allocate(self) -> None:
        """State and scratch buffers for B streams (allocated here, never per token)."""
        B, L, H, P = self.batch_size, self.num_layers, self.hidden_size, self.state_size
        GH = GATES[self.cell] * H
        f32 = dict(dtype=torch.float32, device=self.device)
        self._h = torch.zeros(2, L, B, P, **f32)  # ping-pong: [parity] is the current state
        self._parity = 0
        self._c = torch.zeros(L, B, H, **f32) if self.cell == "lstm" else None
        V = self.vocab_size
        self._logits = torch.empty(B, V if V else P, **f32)
        self._plan = None
        self._graphs = {}
        if self._triton is not None:
            # Where sample-and-step finds its draws and records its results, also from inside
            # the graphs: token j of a generate call uses row j of self._u [capacity, B] (the
            # call's uniforms, filled once per call) and goes to column j of self._tokens
            # [B, capacity] and to self._last [B] (the next step's input); j is the device
            # counter self._col. The buffers grow, and the graphs are re-captured, when a call
            # asks for more; generate copies the tokens out once. self._bad: bad-row flags.
            self._col = torch.zeros((), dtype=torch.int64, device=self.device)
            self._u = torch.empty(0, B, dtype=torch.float64, device=self.device)
            self._tokens = torch.empty(B, 0, dtype=torch.int64, device=self.device)
            self._last = torch.empty(B, dtype=torch.int64, device=self.device)
            self._bad = torch.zeros(B, dtype=torch.int8, device=self.device)
            self._params = torch.zeros(2, dtype=torch.float64, device=self.device)
            from .backends.triton import sampling as triton_sampling

            # One Triton launch per token's sampling where the vocabulary allows, else the
            # rule in torch ops (sampling.sample_with_uniforms).
            self._triton_sample = triton_sampling if triton_sampling.supports(V) else None
            lay = self._layers
            self._triton_step = self._triton.DecodeStep(
                self.cell, B, L, self.input_size, H, P, V,
                self._table, lay[0]["w_ih"], self._w_ih_upper, self._w_hh_all,
                self._b_ih_all, self._b_hh_all, self._w_hr_all, self._head_w, self._head_b,
            )  # fmt: skip
        # the projection's input o * tanh(c), for the C++ and CUDA kernels (Triton's step
        # keeps its own)
        uses_m = self._cpu is not None or self._cuda is not None
        self._m = torch.empty(B, H, **f32) if uses_m else None
        if self._cpu is None:
            return
        self._gi = torch.empty(B, GH, **f32)
        self._gh = torch.empty(B, GH, **f32)
        self._sample_w = torch.empty(B, max(V, 1), dtype=torch.float64)
        self._sample_order = torch.empty(B, max(V, 1), dtype=torch.int32)

        def ptr(t: Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        lay = self._layers
        self._plan = self._cpu.DecoderPlan(
            CELL_CODES[self.cell], L, B, self.input_size, H, P, V,
            1 if self.weights == "bf16" else 0,
            [ptr(d["w_ih"]) for d in lay], [ptr(d["w_hh"]) for d in lay],
            [ptr(d["b_ih"]) for d in lay], [ptr(d["b_hh"]) for d in lay],
            [ptr(d["w_hr"]) for d in lay],
            ptr(self._table), self.vocab_in, ptr(self._head_w), ptr(self._head_b),
            ptr(self._c), ptr(self._gi), ptr(self._gh), ptr(self._m), ptr(self._logits),
        )  # fmt: skip

    def get_state(self) -> Tensor | tuple[Tensor, Tensor]:
        """A copy of the state: ``h [L, B, P]`` (and ``c [L, B, H]`` for LSTM), torch.nn's
        ``h_n`` / ``(h_n, c_n)`` layout."""
        if self._cuda is not None:
            self._cuda.check()  # errors of earlier steps surface here
        h = self._h[self._parity].clone()
        return (h, self._c.clone()) if self.cell == "lstm" else h

    def set_state(self, state: Tensor | tuple[Tensor, Tensor]) -> None:
        """Copy ``state`` (as returned by :meth:`get_state` or torch.nn) into the streams."""
        L, B, H, P = self.num_layers, self.batch_size, self.hidden_size, self.state_size
        if self.cell == "lstm":
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ValueError("state must be a tuple (h [L, B, P], c [L, B, H]) for an LSTM")
            h, c = state
        else:
            h, c = state, None
        for name, t, shape in (("h", h, (L, B, P)), ("c", c, (L, B, H))):
            if name == "c" and self.cell != "lstm":
                continue
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state {name} must have shape {list(shape)}, got {got}")
        self._h[self._parity].copy_(h)
        if c is not None:
            self._c.copy_(c)

    # ------------------------------------------------------------------------------ steps
    def _check_tokens(self, tokens: Tensor, name: str, shape: tuple[int, ...]) -> None:
        if not isinstance(tokens, Tensor) or tuple(tokens.shape) != shape:
            got = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be a LongTensor of shape {list(shape)}, got {got}")
        if tokens.dtype != torch.int64:
            raise ValueError(f"{name} must have dtype torch.int64, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_in:
            raise ValueError(
                f"{name} must hold token ids in [0, {self.vocab_in}), got values in [{lo}, {hi}]"
            )

    def step(self, inputs: Tensor, out: Tensor | None = None) -> Tensor:
        """Advance every stream by one step.

        Args:
            inputs: token ids ``LongTensor [B]`` (with an embedding) or ``[B, I]`` inputs.
            out: optional float32 ``[B, V]`` (``[B, P]`` without a head) to write into; then
                nothing is allocated.

        On backend ``"cuda"`` a step does not wait for the device: an error the kernel
        recorded (a wait past the timeout) is raised by the next :meth:`generate` or
        :meth:`get_state`, or at once with ``RNNKERN_CUDA_DEBUG=1``.

        Returns:
            logits ``[B, V]`` (the top layer's output ``[B, P]`` without a head).
        """
        B = self.batch_size
        if self._table is not None:
            self._check_tokens(inputs, "tokens", (B,))
            tokens, x = inputs.to(self.device).contiguous(), None
        else:
            I = self.input_size
            if not isinstance(inputs, Tensor) or tuple(inputs.shape) != (B, I):
                got = list(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
                raise ValueError(f"inputs must be a float tensor of shape [{B}, {I}], got {got}")
            tokens, x = None, inputs.to(device=self.device, dtype=torch.float32).contiguous()
        width = self.vocab_size or self.state_size
        if out is not None and (
            not isinstance(out, Tensor)
            or tuple(out.shape) != (B, width)
            or out.dtype != torch.float32
            or not out.is_contiguous()
            or out.device != self.device
        ):
            raise ValueError(f"out must be a contiguous float32 tensor [{B}, {width}]")
        h_cur, h_next = self._h[self._parity], self._h[1 - self._parity]
        if self._plan is not None:
            self._plan.step(
                h_cur.data_ptr(), h_next.data_ptr(),
                0 if tokens is None else tokens.data_ptr(), 0 if x is None else x.data_ptr(),
                self._head_w is not None,
            )  # fmt: skip
        elif self._cuda is not None:
            self._cuda.run(
                h=self._h, parity=self._parity, c=self._c, m=self._m, logits=self._logits,
                prime=None if tokens is None else tokens.view(B, 1), x=x,
            )  # fmt: skip
        elif self._triton is not None:
            self._triton_step(
                tokens,
                x,
                h_cur,
                h_next,
                self._c,
                self._logits if self._head_w is not None else None,
            )
        else:
            self._torch_step(tokens, x, h_cur, h_next)
        self._parity ^= 1
        if self._cuda is not None and self._cuda.debug:
            self._cuda.check()  # otherwise errors of steps surface at generate / get_state
        result = self._logits if self._head_w is not None else h_next[-1]
        if out is None:
            return result.clone()
        out.copy_(result)
        return out

    def _torch_step(self, tokens, x, h_cur: Tensor, h_next: Tensor) -> None:
        """One step with torch ops: the reference backend's formulas with T = 1."""
        from .backends.reference import BACKEND as reference

        inp = None
        for l, d in enumerate(self._layers):
            if l == 0 and self._table is not None:
                gx = self._table[tokens]
            else:
                inp = x if l == 0 else h_next[l - 1]
                gx = torch.nn.functional.linear(inp, d["w_ih"].float(), d["b_ih"])
            c0 = self._c[l] if self._c is not None else None
            w_hr = d["w_hr"].float() if d["w_hr"] is not None else None
            r = reference.forward(
                self.cell, gx.unsqueeze(0), h_cur[l], c0, d["w_hh"].float(), d["b_hh"], w_hr,
                None, False, False,
            )  # fmt: skip
            h_next[l].copy_(r.h_n)
            if self._c is not None:
                self._c[l].copy_(r.c_n)
        if self._head_w is not None:
            torch.nn.functional.linear(h_next[-1], self._head_w.float(), self._head_b,
                                       out=self._logits)  # fmt: skip

    def generate(
        self,
        prime: Tensor,
        steps: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        first_step: int = 0,
    ) -> Tensor:
        """Feed ``prime [B, S]`` then sample ``steps`` tokens per stream; one C++ call.

        Token ``j`` of stream ``b`` is drawn by :func:`rnnkern.sampling.sample`'s rule with
        ``uniform(seed, b, first_step + j)`` from the logits after the prime and tokens
        ``0 .. j-1``. The state afterwards has consumed the prime and every sampled token but
        the last, so ``generate(out[:, -1:], ..., first_step=first_step + steps)`` continues the
        sequence with the same random numbers one long call would have used.

        Returns:
            ``LongTensor [B, steps]``.
        """
        if self._table is None or self._head_w is None:
            raise ValueError("generate needs an embedding (token input) and a head (logits)")
        if self.vocab_size > self.vocab_in:
            raise ValueError(
                f"generate feeds sampled tokens back: head.out_features ({self.vocab_size}) must "
                f"not exceed embedding.num_embeddings ({self.vocab_in})"
            )
        sampling.check_sampling_args(temperature, top_k, top_p)
        top_k = min(int(top_k), self.vocab_size)  # (equal in effect; fits the kernels' int64)
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        seed = sampling._check_u64("seed", seed)
        first_step = sampling._check_u64("first_step", first_step)
        if first_step + int(steps) > 2**64:  # (the steps' indices are u64 too)
            raise ValueError(
                f"first_step + steps must be at most 2**64, got {first_step} + {int(steps)}"
            )
        B = self.batch_size
        if not isinstance(prime, Tensor) or prime.dim() != 2 or prime.shape[0] != B:
            got = list(prime.shape) if isinstance(prime, Tensor) else type(prime).__name__
            raise ValueError(
                f"prime must be a LongTensor [B, S] with B = {B} streams (reset(batch_size=...) "
                f"changes B) and S >= 1, got {got}"
            )
        if prime.shape[1] < 1:
            raise ValueError(
                f"prime must have at least one token per stream, got {list(prime.shape)}"
            )
        self._check_tokens(prime, "prime", tuple(prime.shape))
        prime = prime.to(self.device).contiguous()
        out = torch.empty(B, int(steps), dtype=torch.int64, device=self.device)
        if self._triton is not None:
            return self._device_generate(prime, out, temperature, top_k, top_p, seed, first_step)
        if self._cuda is not None:
            self._cuda.check()  # an error of an earlier step is not this call's
            model_steps = self._cuda.run(
                h=self._h, parity=self._parity, c=self._c, m=self._m, logits=self._logits,
                prime=prime, steps=int(steps), out=out,
                sampling=(temperature, top_k, top_p, seed, first_step),
            )  # fmt: skip
            self._parity ^= model_steps & 1
            self._cuda.check()
            return out
        if self._plan is None:
            return self._torch_generate(prime, out, temperature, top_k, top_p, seed, first_step)
        model_steps, error_row = self._plan.generate(
            self._h[self._parity].data_ptr(), self._h[1 - self._parity].data_ptr(),
            prime.data_ptr(), prime.shape[1], int(steps), out.data_ptr(),
            float(temperature), int(top_k), float(top_p), seed, first_step,
            self._sample_w.data_ptr(), self._sample_order.data_ptr(),
        )  # fmt: skip
        self._parity ^= model_steps & 1
        if error_row >= 0:
            raise bad_logits_error(error_row)
        return out

    def sample(
        self,
        logits: Tensor,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        step: int = 0,
    ) -> Tensor:
        """Draw one token per stream from ``logits [B, V]``: the sampler :meth:`generate` runs,
        for a loop written around :meth:`step` (one that edits the logits between steps, say).

        Row ``b`` is drawn by :func:`rnnkern.sampling.sample`'s rule with
        ``uniform(seed, b, step)``, so ``sample(step(tok), ..., step=j)`` in a loop gives
        :meth:`generate`'s tokens. On backend ``"cpu"`` float32 CPU logits go to the C++
        sampler (6.5 us per call at B=1, V=137, against 106 us for
        :func:`rnnkern.sampling.sample`); other logits and backends use
        :func:`rnnkern.sampling.sample` itself. Raises ValueError for bad arguments or for a
        row with NaN / +inf or with every entry -inf (TypeError for a ``seed`` or ``step``
        that is not an int).

        Returns:
            ``LongTensor [B]`` on the logits' device.
        """
        B, V = self.batch_size, self.vocab_size
        if not V:
            raise ValueError("sample needs a head (the decoder has no logits to sample from)")
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (B, V):
            got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a float tensor [{B}, {V}], got {got}")
        if self._plan is None or logits.dtype != torch.float32 or logits.device.type != "cpu":
            return sampling.sample(logits, temperature, top_k, top_p, seed, step)
        sampling.check_sampling_args(temperature, top_k, top_p)
        top_k = min(int(top_k), V)  # (equal in effect; fits the kernel's int64)
        seed = sampling._check_u64("seed", seed)
        step = sampling._check_u64("step", step)
        logits = logits.contiguous()
        out = torch.empty(B, dtype=torch.int64)
        bad = self._cpu.sample_rows(
            logits.data_ptr(), B, V, float(temperature), int(top_k), float(top_p), seed, step,
            out.data_ptr(), self._sample_w.data_ptr(), self._sample_order.data_ptr(),
        )  # fmt: skip
        if bad >= 0:
            sampling.check_finite_rows(logits, temperature)  # raises, naming the row
        return out

    def _torch_generate(self, prime, out, temperature, top_k, top_p, seed, first_step) -> Tensor:
        """``generate`` with torch ops, as :meth:`_device_generate` runs it: the draws made up
        front, per token one sample (the rule's flagged form) and one step on already checked
        token ids, and non-finite logits checked once at the end: no host synchronisation,
        copy or check per token (:meth:`step` checks its ids and copies the logits)."""
        B, steps = out.shape
        u = sampling.uniforms_table(seed, first_step, steps, B, self.device)
        bad = torch.zeros(B, dtype=torch.bool, device=self.device)
        for column in prime.t().contiguous():  # (the prime's ids were checked by generate)
            self._torch_advance(column)
        for j in range(steps):
            tokens, bad_j = sampling.sample_with_uniforms(
                self._logits, temperature, top_k, top_p, u[j]
            )
            bad |= bad_j
            out[:, j] = tokens
            if j + 1 < steps:
                self._torch_advance(tokens)
        if bool(bad.any()):
            raise bad_logits_error(int(bad.nonzero()[0, 0]))
        return out

    def _torch_advance(self, tokens: Tensor) -> None:
        """One step of backend torch from token ids ``[B]`` on the device, unchecked."""
        h = self._h
        self._torch_step(tokens, None, h[self._parity], h[1 - self._parity])
        self._parity ^= 1

    # ------------------------------------------------------------------------------ device loop
    def _triton_advance(self, tokens: Tensor) -> None:
        """One step from token ids already on the device: no checks, no host synchronisation."""
        h = self._h
        self._triton_step(tokens, None, h[self._parity], h[1 - self._parity], self._c, self._logits)
        self._parity ^= 1

    def _device_generate(self, prime, out, temperature, top_k, top_p, seed, first_step) -> Tensor:
        """``generate`` on the device: the prime, then per token one sample (on the device,
        by the rule of :mod:`rnnkern.sampling`) and one step, with no host round trip; the
        only synchronisation is the check for non-finite logits at the end. On CUDA the
        tokens between the first and the last are replays of captured CUDA graphs of
        ``graph_tokens`` sample-and-steps each (:func:`_replay_plan`)."""
        B, steps = prime.shape[0], out.shape[1]
        dev = self.device
        # (first: a bad graph_tokens raises before the state moves)
        plan = _replay_plan(steps, self.graph_tokens, dev.type == "cuda" and self.cuda_graphs)
        for column in prime.t().contiguous():  # one copy, then a contiguous [B] row per step
            self._triton_advance(column)
        if self._tokens.shape[1] < steps:
            capacity = max(steps, 2 * self._tokens.shape[1])
            self._tokens = torch.empty(B, capacity, dtype=torch.int64, device=dev)
            self._u = torch.empty(capacity, B, dtype=torch.float64, device=dev)
            self._graphs.clear()  # they read and write the old buffers
        self._u[:steps].copy_(sampling.uniforms_table(seed, first_step, steps, B, dev))
        self._params.copy_(torch.tensor([float(temperature), float(top_p)], dtype=torch.float64))
        self._col.zero_()
        self._bad.zero_()
        for i, count in enumerate(plan):
            if count:
                self._graph(temperature, top_k, top_p, count).replay()
                self._parity ^= count & 1
            else:
                tok = self._sample_and_record(temperature, top_k, top_p)
                if i + 1 < len(plan):  # (the last token is sampled, not stepped)
                    self._triton_advance(tok)
        out.copy_(self._tokens[:, :steps])
        if self._triton_step.n_split > 1:
            self._triton_step.check_sync()
        if bool(self._bad.any()):
            raise bad_logits_error(int(self._bad.nonzero()[0, 0]))
        return out

    def _sample_and_record(self, temperature, top_k, top_p) -> Tensor:
        """Sample ``[B]`` tokens from ``self._logits`` with the draws of row ``self._col`` of
        ``self._u``, record them in that column of ``self._tokens`` and in ``self._last``
        (returned), flag bad rows in ``self._bad``, then advance ``self._col``; device ops
        only, so a graph can capture it."""
        if self.fused_sampling and self._triton_sample is not None:
            self._triton_sample.sample_rows(
                self._logits, self._u, self._col, self._tokens, self._last, self._bad,
                self._params, top_k, top_p,
            )  # fmt: skip
        else:
            u = self._u.index_select(0, self._col.view(1)).view(-1)
            tok, flag = sampling.sample_with_uniforms(self._logits, temperature, top_k, top_p, u)
            self._tokens.index_copy_(1, self._col.view(1), tok.view(-1, 1))
            self._last.copy_(tok)
            self._bad |= flag.to(torch.int8)
        self._col += 1
        return self._last

    def _graph(self, temperature, top_k, top_p, count: int) -> torch.cuda.CUDAGraph:
        """The CUDA graph of ``count`` sample-and-steps from the current parity, captured on
        first use for these sampling arguments: each :meth:`_sample_and_record`, then the
        step on the sampled tokens. ``count`` tokens cost one replay and nothing else."""
        key = (self._parity, count, float(temperature), int(top_k), float(top_p),
               self.fused_sampling)  # fmt: skip
        if key not in self._graphs:
            graph = torch.cuda.CUDAGraph()
            h, parity = self._h, self._parity
            with torch.cuda.graph(graph):
                for _ in range(count):
                    tok = self._sample_and_record(temperature, top_k, top_p)
                    self._triton_step(tok, None, h[parity], h[1 - parity], self._c, self._logits)
                    parity ^= 1
            self._graphs[key] = graph
        return self._graphs[key]


def _replay_plan(steps: int, per_graph: int, use_graph: bool) -> list[int]:
    """How ``generate`` runs its ``steps`` tokens on the device, in order: 0 for a token run
    eagerly (sampled, then stepped, but the last), ``k > 0`` for one replay of a graph of ``k``
    sample-and-steps. The first token runs eagerly (it compiles and warms every kernel), and
    so does the last (sampled only); graphs of ``per_graph`` tokens (1, or even, so that a
    replay ends on the parity it began with) take the rest, and graphs of one the remainder."""
    if (
        isinstance(per_graph, bool)
        or not isinstance(per_graph, int)
        or per_graph < 1
        or (per_graph > 1 and per_graph % 2)
    ):
        raise ValueError(f"graph_tokens must be 1 or a positive even int, got {per_graph!r}")
    if not use_graph or steps < 3:
        return [0] * steps
    middle = steps - 2
    return [0] + [per_graph] * (middle // per_graph) + [1] * (middle % per_graph) + [0]


def bad_logits_error(row: int) -> FloatingPointError:
    """What ``generate`` raises on every backend when a stream's logits cannot be sampled from
    (NaN or +inf, or only -inf), naming the first such stream."""
    return FloatingPointError(
        f"generate: the logits of stream {row} became NaN or +inf, or all -inf (the model's "
        "weights or state hold non-finite values)"
    )


def _cuda_graphs_enabled() -> bool:
    """``RNNKERN_DECODE_CUDA_GRAPH=0`` turns graph capture off (every launch eager)."""
    import os

    value = os.environ.get("RNNKERN_DECODE_CUDA_GRAPH", "1")
    if value not in ("0", "1"):
        raise ValueError(f"RNNKERN_DECODE_CUDA_GRAPH must be 0 or 1, got {value!r}")
    return value == "1"


def _triton_decode_module(device: torch.device):
    """:mod:`rnnkern.backends.triton.decode`, or a clear error why backend 'triton' cannot
    decode on ``device``."""
    try:
        from .backends.triton import decode as triton_decode
    except ImportError as err:
        raise RuntimeError(
            f"backend 'triton' needs Triton (pip install 'rnnkern[triton]'): {err}"
        ) from None
    from .backends.triton.common import INTERPRET

    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return triton_decode
    raise ValueError(
        f"backend 'triton' decodes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
        f"got the model on {device}"
    )
