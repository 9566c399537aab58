"""``rnnkern.Decoder(backend="cuda")``: whole-sequence generation in one CUDA launch.

The kernel (``csrc/cuda/generate.cu``, module ``rnnkern._cuda``) runs, for ``n`` tokens and
``B`` streams, every layer, the output head, the sampling rule of :mod:`rnnkern.sampling`
(``csrc/common/sampling_rule.h``, the C++ decoder's own code) and the feedback of each token
through the token table, in one persistent cooperative launch: no host round trip and no launch
per token. :class:`CudaDecode` holds what the launches share (the layer table in device memory,
the status words) and turns the kernel's status into Python exceptions.

Status. ``sync`` is int64 ``[4]`` on the device: barrier arrivals (zeroed by the launcher before
each launch); abort (a wait past ``RNNKERN_CUDA_BARRIER_TIMEOUT_S``, which stops every block
and every later launch until reported); the first non-fatal error (non-finite logits or a bad
token: the stream went on with token 0, as in the C++ decoder) and its row.
:meth:`CudaDecode.check` reads it back (a host synchronisation), raises and clears it;
``Decoder.generate`` and ``Decoder.get_state`` call it, ``Decoder.step`` only with
``RNNKERN_CUDA_DEBUG=1`` (a step should not wait for the device), so an error in a step
surfaces at the next ``generate`` or ``get_state``. The callers check after they have moved
their state's parity past the launch, so the state stays consistent with the kernel's.

Synchronisation. Blocks wait for each other's results in one of two ways
(``RNNKERN_CUDA_GENERATE_SYNC`` or :attr:`CudaDecode.sync`): ``"flags"`` (default) exchanges
every value other blocks read as a 64-bit word carrying the tag of the phase that wrote it, so
a block waits only for the words it reads (the exchange buffers and the running tag live here);
``"barrier"`` meets at a grid-wide barrier after every layer and the head and reads plain
floats. Both give bit-identical results (the same arithmetic in the same order); the second is
the simpler cross-check of the first. ``RNNKERN_CUDA_GENERATE_CARRY=0`` (or
:attr:`CudaDecode.carry`) likewise turns off forming recurrent parts a step early, and
``RNNKERN_CUDA_GENERATE_SPIN_SLEEP_NS`` (:attr:`CudaDecode.spin_sleep_ns`, default 0) pauses
between polls in flags mode.

Legend: ``B`` streams, ``L`` layers, ``I`` input size, ``H`` hidden, ``P`` state size, ``V``
head outputs, ``S`` fed steps.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import cuda as cuda_backend
from .base import CELL_CODES
from .cuda import _ERRORS, _debug, _ptr, _timeout_ns, build_hint

_WDTYPE = {torch.float32: 0, torch.bfloat16: 2}  # csrc/cuda/api.h DType
_SYNC_MODES = ("flags", "barrier")
_TAG_LIMIT = 1 << 32  # tags are 32 bits; 0 is the exchange buffers' initial value


def _carry_from_env() -> bool:
    value = os.environ.get("RNNKERN_CUDA_GENERATE_CARRY", "1")
    if value not in ("0", "1"):
        raise ValueError(f"RNNKERN_CUDA_GENERATE_CARRY must be 0 or 1, got {value!r}")
    return value == "1"


def _spin_sleep_from_env() -> int:
    value = os.environ.get("RNNKERN_CUDA_GENERATE_SPIN_SLEEP_NS", "0")
    if not value.isdigit() or int(value) > 1_000_000:
        raise ValueError(
            f"RNNKERN_CUDA_GENERATE_SPIN_SLEEP_NS must be an int in [0, 1000000], got {value!r}"
        )
    return int(value)


def _sync_mode_from_env() -> str:
    mode = os.environ.get("RNNKERN_CUDA_GENERATE_SYNC", "flags")
    if mode not in _SYNC_MODES:
        raise ValueError(f"RNNKERN_CUDA_GENERATE_SYNC must be 'flags' or 'barrier', got {mode!r}")
    return mode


def unavailable_reason(device: torch.device) -> str | None:
    """Why backend ``cuda`` cannot decode a model on ``device``, or None when it can (under
    the CPU emulation of the kernels, :mod:`rnnkern.backends.cuda`: a model on the CPU)."""
    if cuda_backend._cuda is None:
        return build_hint()
    if cuda_backend.device_type() == "cpu":
        if device.type != "cpu":
            return f"the emulated CUDA kernels decode models on the CPU, got the model on {device}"
        return None
    if device.type != "cuda":
        return f"backend 'cuda' decodes models on a CUDA device, got the model on {device}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


class CudaDecode:
    """The packed model's geometry and buffers as ``csrc/cuda/api.h``'s ``GenerateArgs`` reads
    them; ``layers`` / ``table`` / ``head_w`` / ``head_b`` are the Decoder's packed tensors
    (kept alive by the Decoder)."""

    def __init__(
        self,
        cell: str,
        layers: list[dict],
        table: Tensor | None,
        head_w: Tensor | None,
        head_b: Tensor | None,
        I: int,
        H: int,
        P: int,
        device: torch.device,
    ) -> None:
        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(reason)
        streamed = layers[0]["w_hh"].dtype
        if streamed not in _WDTYPE:
            raise ValueError(f"backend 'cuda' decodes float32 or bfloat16 weights, got {streamed}")
        # One LayerWeights (five device addresses, csrc/cuda/api.h) per layer, in device memory.
        keys = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
        self._layer_table = torch.tensor(
            [[_ptr(d[k]) for k in keys] for d in layers], dtype=torch.int64, device=device
        )
        self._sync = torch.zeros(4, dtype=torch.int64, device=device)
        self.device = device
        self.sync = _sync_mode_from_env()  # "flags" or "barrier" (module docstring)
        # Form each layer's recurrent part a step early where the plan allows (csrc/cuda/
        # generate.cu); False is the cross-check (bit-identical results).
        self.carry = _carry_from_env()
        # Flags mode: nanoseconds to pause between polls of a word not yet written (0: poll back
        # to back). A knob for measuring whether polling slows the producers down.
        self.spin_sleep_ns = _spin_sleep_from_env()
        self._exchange_batch = 0  # the batch size the exchange buffers were made for
        self._xh = self._xm = self._xl = None
        self._tag_base = 1
        self._geometry = (len(layers), P, H, layers[0]["w_hr"] is not None)
        self.last_launch: dict | None = None  # layout of the latest launch (tests, benchmarks)
        self._base = dict(
            cell=CELL_CODES[cell],
            wdtype=_WDTYPE[streamed],
            proj=int(layers[0]["w_hr"] is not None),
            L=len(layers),
            I=I,
            H=H,
            P=P,
            V=0 if head_w is None else head_w.shape[0],
            vocab_in=0 if table is None else table.shape[0],
            layers=self._layer_table.data_ptr(),
            table=_ptr(table),
            head_w=_ptr(head_w),
            head_b=_ptr(head_b),
            sync=self._sync.data_ptr(),
        )

    def _args(self, B, h, parity, c, m, logits, feed, prime, x, steps, out, sampling) -> dict:
        temperature, top_k, top_p, seed, first_step = sampling
        return dict(
            self._base,
            B=B,
            h=_ptr(h),
            parity=parity,
            c=_ptr(c),
            m=_ptr(m),
            logits=_ptr(logits) if self._base["V"] else 0,
            feed=feed,
            prime=_ptr(prime),
            x=_ptr(x),
            steps=steps,
            out=_ptr(out),
            temperature=float(temperature),
            # top_k >= V is top-k off, as is V itself (and V fits the kernel's int)
            top_k=min(int(top_k), max(self._base["V"], 1)),
            top_p=float(top_p),
            seed=int(seed),
            first_step=int(first_step),
            flags=0,
            carry=int(self.carry),
            spin_sleep_ns=int(self.spin_sleep_ns),
            tag_base=0,
            xh=0,
            xm=0,
            xl=0,
            trace=0,
            trace_steps=0,
        )

    def _prepare_exchange(self, B: int, tags: int) -> None:
        """Exchange buffers for ``B`` streams, and room for ``tags`` fresh tags: the buffers
        are zeroed (tag 0 is never used) when made, and when the 32-bit tags run out."""
        if tags >= _TAG_LIMIT - 1:
            raise ValueError(
                f"one generate call of backend 'cuda' runs at most {_TAG_LIMIT - 2} model phases "
                f"(steps x (2 x layers + 1)), got {tags}: split it (first_step continues the "
                "random numbers)"
            )
        if self._exchange_batch != B or self._tag_base + tags > _TAG_LIMIT:
            L, P, H, proj = self._geometry
            V = self._base["V"]
            z = dict(dtype=torch.int64, device=self.device)
            self._xh = torch.zeros(2, L, B, P, **z)
            self._xm = torch.zeros(L, B, H, **z) if proj else None
            self._xl = torch.zeros(B, V, **z) if V else None
            self._exchange_batch, self._tag_base = B, 1

    def run(
        self,
        h: Tensor,
        parity: int,
        c: Tensor | None,
        m: Tensor | None,
        logits: Tensor,
        *,
        prime: Tensor | None = None,
        x: Tensor | None = None,
        steps: int = 0,
        out: Tensor | None = None,
        sampling: tuple = (1.0, 0, 1.0, 0, 0),
    ) -> int:
        """Enqueue one launch on torch's current stream: feed ``prime [B, S]`` (token ids) or
        ``x [B, I]`` (one step), then sample ``steps`` tokens into ``out [B, steps]`` with
        ``sampling = (temperature, top_k, top_p, seed, first_step)``. ``h`` is the Decoder's
        ``[2, L, B, P]`` ping-pong state with slot ``parity`` current. Returns the number of
        model steps run (the new parity is ``parity ^ (model_steps & 1)``). Arguments are
        checked by the Decoder; the launcher checks them again (a ValueError here is a bug)."""
        if self.sync not in _SYNC_MODES:
            raise ValueError(f"sync must be 'flags' or 'barrier', got {self.sync!r}")
        B = h.shape[2]
        feed = prime.shape[1] if prime is not None else 1
        args = self._args(B, h, parity, c, m, logits, feed, prime, x, steps, out, sampling)
        flags = self.sync == "flags"
        tags = (feed + max(steps - 1, 0)) * (2 * self._base["L"] + 1)
        on_gpu = self.device.type == "cuda"
        if flags:
            self._prepare_exchange(B, tags)
            args.update(flags=1, tag_base=self._tag_base, xh=_ptr(self._xh), xm=_ptr(self._xm),
                        xl=_ptr(self._xl))  # fmt: skip
            self._tag_base += tags  # spent even if the launch fails: never reused
            for t in (self._xh, self._xm, self._xl):
                if t is not None and on_gpu:  # in use on this stream until the launch ends
                    t.record_stream(torch.cuda.current_stream(self.device))
        with cuda_backend.on_device(self.device):  # the launcher works on the current device
            points = int(cuda_backend._cuda.generate_trace_points(self._base["L"]))
            trace, trace_steps = cuda_backend._trace_buffer(self.device, points)  # (its SMs)
            args.update(trace=_ptr(trace), trace_steps=trace_steps)
            model_steps, info = cuda_backend._cuda.generate(
                args, cuda_backend.stream_handle(self.device), _timeout_ns(), _debug()
            )
        self.last_launch = info
        cuda_backend._record_trace("generate", info, trace)
        return int(model_steps)

    @property
    def debug(self) -> bool:
        """``RNNKERN_CUDA_DEBUG=1``: the Decoder checks every launch at once."""
        return _debug()

    def check(self) -> None:
        """Raise the error the kernel recorded since the last check, if any (and clear it).
        Reads the status back, so it waits for the launches enqueued so far."""
        _, abort, code, row = self._sync.tolist()
        if abort == 0 and code == 0:
            return
        self._sync[1:].zero_()
        if abort:
            raise RuntimeError(
                "rnnkern._cuda generate: " + _ERRORS.get(abort, f"unknown error code {abort}")
            )
        if code == int(cuda_backend._cuda.ERR_NON_FINITE):
            from ..decode import bad_logits_error

            raise bad_logits_error(row)
        if code == int(cuda_backend._cuda.ERR_BAD_TOKEN):
            raise ValueError(f"a token id of stream {row} is outside the embedding's range")
        raise RuntimeError(
            "rnnkern._cuda generate: " + _ERRORS.get(code, f"unknown error code {code}")
        )
