"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU``, ``RNN`` and their cells.

Constructor arguments, parameter names, shapes, initialisation, gate order, accepted inputs
(batched and unbatched tensors, ``batch_first``, PackedSequence sorted or not, optional initial
state) and returned structures are torch.nn's, so ``load_state_dict`` works both ways. The
extra keyword ``backend`` picks the implementation ("auto" by default; see
:mod:`rnnkern.dispatch`).

Legend: ``T`` time, ``B`` batch, ``I`` input size, ``H`` hidden size, ``P`` state size
(``proj_size`` or ``H``), ``L`` layers, ``D`` directions (1 or 2).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import NoReturn

import torch
from torch import _VF, Tensor
from torch.nn import Parameter, init
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends
from .backends.base import LayerConfig, gate_count, state_dtype
from .dispatch import Choice, choose, select
from .functional import input_projection, layer_recurrence, needs_grad

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "explain"]

_CELL = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class RNNInputError(ValueError, RuntimeError):
    """Bad input or state for a module call.

    It is both a ValueError and a RuntimeError so that code written against torch.nn, which
    raises either for the same mistakes, keeps catching it.
    """


class RNNInputTypeError(RNNInputError, TypeError):
    """An input or state of the wrong type (torch.nn raises a TypeError or AttributeError
    there); also a TypeError."""


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        what = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_weights(
    module: torch.nn.Module,
    names: list[str],
    shapes: list[tuple[int, ...]],
    x: Tensor,
    autocast: bool,
    optional: frozenset[str] = frozenset(),
) -> list[Tensor | None]:
    """The weights ``names``, read once for the call (a parametrized weight is computed once:
    a stateful parametrization such as spectral_norm advances once a call), each checked: of
    its ``shapes`` entry, on the input's device and all in one dtype, the input's unless under
    autocast (where torch.nn casts, and so does rnnkern). A None weight is skipped where its name
    is ``optional`` (the cells' biases, as torch.nn's cells take None), else a TypeError, as
    in torch.nn's sequence modules. The kernels read the weights by address and take their sizes
    from the module: a weight of another shape (replaced after construction), elsewhere (a
    meta weight left by a conversion) or in another dtype would be read as garbage, or past
    its end, not refused."""
    first = None
    params = module._parameters
    weights: list[Tensor | None] = []
    for name, shape in zip(names, shapes, strict=True):
        # (the dict first: Module.__getattr__ costs ~0.5 us a weight per call; a parametrized,
        # replaced or deleted weight takes torch's own lookup, and its AttributeError)
        w = params.get(name)
        if w is None:
            w = getattr(module, name)
        weights.append(w)
        if w is None:
            if name in optional:
                continue
            built = f" (the module was built with bias={module.bias})" if "bias" in name else ""
            raise TypeError(f"{name} must be a Tensor of shape {list(shape)}, got None{built}")
        if not isinstance(w, Tensor):
            raise TypeError(
                f"{name} must be a Tensor of shape {list(shape)}, got {type(w).__name__}"
            )
        if w.shape != shape:
            raise RNNInputError(
                f"{name} must have shape {list(shape)} (from the module's sizes), got "
                f"{_shape(w)}: a weight replaced after construction must keep its shape"
            )
        if first is None:
            first = w
            if x.dtype != w.dtype and not autocast:
                raise RNNInputError(
                    f"input dtype ({x.dtype}) does not match weight dtype ({w.dtype}). Convert "
                    f"input: input.to({w.dtype}), or convert model: model.to({x.dtype})"
                )
        elif w.dtype != first.dtype:
            raise RNNInputError(
                f"{name} has dtype {w.dtype}, {names[0]} {first.dtype}: every weight must have "
                f"one dtype (model.to(dtype) converts them all)"
            )
        if w.device != x.device:
            raise RNNInputError(
                f"input must be on the parameters' device {w.device}, got {x.device}"
                if w is first
                else f"{name} is on {w.device}, the input and {names[0]} on {x.device}: every "
                "weight must be on the input's device (model.to(device) moves them all)"
            )
    return weights


def _refuse_script(self) -> NoReturn:
    # torch.jit.script calls this on every module it compiles, before compiling it. Returning
    # a torch.nn module instead would put it in place of this one inside the caller's model
    # (torch.jit replaces submodules with what this returns), so refuse, and say what works.
    name = type(self).__name__
    raise RuntimeError(
        f"torch.jit.script cannot compile rnnkern.{name}: its forward chooses a kernel backend "
        f"in Python, which TorchScript does not compile. torch.jit.trace, torch.export and "
        f"torch.compile work with it; to script, swap in torch.nn.{name} first: "
        f"rnnkern.convert(model, to='torch')"
    )


class _RNNBase(torch.nn.Module):
    """Shared constructor, parameters and forward of LSTM, GRU and RNN."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("proj_size", proj_size, 0)
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_bool("bidirectional", bidirectional)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Number)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of "
                f"an element being zeroed, got {dropout!r}"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                f"and hidden_size={hidden_size}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        if dtype is not None and dtype not in _FLOATS:
            raise ValueError(f"dtype must be a floating dtype {_FLOATS}, got {dtype}")
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backends.check_name(backend)

        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        # Same names, shapes and registration order as torch.nn, so that reset_parameters
        # draws the same numbers under the same seed.
        for shapes in self._weight_groups():
            for name, shape in shapes:
                setattr(self, name, Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.extend(name for name, _ in shapes)
            self._all_weights.append([name for name, _ in shapes])
        self._weight_shapes()  # (cached now: an attribute of every instance, as torch.nn's are)
        self.flatten_parameters()
        self.reset_parameters()

    __prepare_scriptable__ = _refuse_script

    def _weight_groups(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Per layer and direction, the weights' names and shapes, in torch.nn's order."""
        G = _GATES[self.mode]
        H = self.hidden_size
        P = self.proj_size or H
        D = 2 if self.bidirectional else 1
        groups = []
        for layer in range(self.num_layers):
            for direction in range(D):
                layer_input = self.input_size if layer == 0 else P * D
                suffix = "_reverse" if direction == 1 else ""
                shapes = [
                    (f"weight_ih_l{layer}{suffix}", (G * H, layer_input)),
                    (f"weight_hh_l{layer}{suffix}", (G * H, P)),
                ]
                if self.bias:
                    shapes += [
                        (f"bias_ih_l{layer}{suffix}", (G * H,)),
                        (f"bias_hh_l{layer}{suffix}", (G * H,)),
                    ]
                if self.proj_size:
                    shapes.append((f"weight_hr_l{layer}{suffix}", (self.proj_size, H)))
                groups.append(shapes)
        return groups

    def _weight_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of ``_flat_weights_names``' weights (computed once; a module unpickled
        from an older version computes them on its first call)."""
        shapes = self.__dict__.get("_flat_weight_shapes")
        if shapes is None:
            shapes = [shape for group in self._weight_groups() for _, shape in group]
            self.__dict__["_flat_weight_shapes"] = shapes
        return shapes

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """torch.nn's own: on CUDA, make the weights views into one buffer in cuDNN's layout.

        Without it cuDNN (backend ``torch``) compacts the weights into a fresh buffer on every
        call and warns so (seen in the H100 runs, where ``auto`` then ran at 0.87-0.96x
        torch.nn). This module has the attributes torch's implementation reads (mode, sizes,
        ``_flat_weights``), so it is reused rather than copied; elsewhere it does nothing.
        """
        torch.nn.RNNBase.flatten_parameters(self)

    def _apply(self, fn, recurse=True):
        # As torch.nn does: moving to a GPU re-flattens the weights for cuDNN.
        result = super()._apply(fn, recurse)
        self.flatten_parameters()
        return result

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # ----------------------------------------------------------------------------- forward

    @property
    def _cell(self) -> str:
        return _CELL[self.mode]

    def _state_shapes(self, B: int) -> list[tuple[str, tuple[int, int, int]]]:
        D = 2 if self.bidirectional else 1
        P = self.proj_size or self.hidden_size
        shapes = [("h_0", (self.num_layers * D, B, P))]
        if self.mode == "LSTM":
            shapes.append(("c_0", (self.num_layers * D, B, self.hidden_size)))
        return shapes

    def _check_input(self, x: Tensor, packed: bool, autocast: bool) -> list[Tensor]:
        """Checks the input and the weights; returns the weights (``_flat_weights_names``'),
        read once for the call."""
        if not isinstance(x, Tensor):
            raise RNNInputTypeError(
                f"input must be a Tensor or PackedSequence, got {type(x).__name__}"
            )
        names = self._flat_weights_names
        weights = _check_weights(self, names, self._weight_shapes(), x, autocast)
        if packed and x.dim() != 2:
            raise RNNInputError(
                f"a PackedSequence's data must be 2-D [total steps, input_size], got "
                f"{x.dim()}-D of shape {_shape(x)}"
            )
        if not packed and x.dim() not in (2, 3):
            raise RNNInputError(
                f"{type(self).__name__}: input must be 2-D (unbatched: [T, I]) or 3-D "
                f"(batched), got {x.dim()}-D of shape {_shape(x)}"
            )
        if x.shape[-1] != self.input_size:
            raise RNNInputError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.shape[-1]}"
            )
        time_dim = 1 if self.batch_first and x.dim() == 3 else 0
        if not packed and x.shape[time_dim] == 0:  # (an empty batch is fine, as in torch.nn)
            raise RNNInputError(
                f"input must have at least one time step (dimension {time_dim}), got shape "
                f"{_shape(x)}"
            )
        return weights

    def _check_state(
        self, hx, B: int, batched: bool, x: Tensor, autocast: bool
    ) -> list[Tensor] | None:
        """Validate the user's initial state; returns it as a list of 3-D tensors."""
        if hx is None:
            return None
        shapes = self._state_shapes(B)
        if self.mode == "LSTM":
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise RNNInputTypeError(
                    f"LSTM hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
                    + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else "")
                )
            states = list(hx)
        else:
            states = [hx]
        out = []
        for (name, shape), t in zip(shapes, states, strict=True):
            if not isinstance(t, Tensor):
                raise RNNInputTypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            want_dim = 3 if batched else 2
            if t.dim() != want_dim:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RNNInputError(
                    f"For {kind} input, {name} must be {want_dim}-D, got {t.dim()}-D of shape "
                    f"{_shape(t)}"
                )
            if not batched:
                t = t.unsqueeze(1)
            if tuple(t.shape) != shape:
                expected = list(shape) if batched else [shape[0], shape[2]]
                got = _shape(t) if batched else [t.shape[0], t.shape[2]]
                raise RNNInputError(f"Expected {name} size {expected}, got {got}")
            if t.dtype != x.dtype and not autocast:
                raise RNNInputError(f"{name} dtype must be {x.dtype} like the input, got {t.dtype}")
            if t.device != x.device:
                raise RNNInputError(f"{name} must be on device {x.device}, got {t.device}")
            out.append(t)
        return out

    def _layer_config(self, x: Tensor, B: int, T: int, has_lengths: bool, hx) -> LayerConfig:
        grad = needs_grad((x,), self.parameters(), hx or ())
        return LayerConfig(
            self._cell,
            x.device.type,
            x.dtype,
            self.input_size,
            self.hidden_size,
            self.proj_size,
            B,
            T,
            has_lengths,
            grad,
        )

    def _prepare(self, input, hx):
        """Check a call's arguments and bring the input to ``[T, B, I]``.

        Returns ``(x, lengths, lengths_cpu, batched, states, weights, cast, config)``:
        ``lengths`` is None when every sequence has length ``T``; ``lengths_cpu`` holds a
        PackedSequence's lengths in the caller's batch order (None for tensors); ``weights``
        those of ``_flat_weights_names``, read once; ``cast`` is, under autocast,
        the dtypes torch.nn returns y and the final states in (:func:`_autocast_dtypes`; the
        layers run in y's, which ``config`` carries), else None.
        """
        lengths_cpu = None
        lengths = None
        data = input.data if isinstance(input, PackedSequence) else input
        autocast = isinstance(data, Tensor) and _autocast_on(data)
        if isinstance(input, PackedSequence):
            weights = self._check_input(input.data, packed=True, autocast=autocast)
            # Padded in the caller's batch order (pad_packed_sequence undoes the sort), so the
            # initial and final states need no permutation.
            x, lengths_cpu = pad_packed_sequence(input)
            batched = True
            if int(lengths_cpu.min()) != x.shape[0]:
                lengths = lengths_cpu.to(device=x.device, dtype=torch.long)
        else:
            weights = self._check_input(input, packed=False, autocast=autocast)
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
            if self.batch_first:
                x = x.transpose(0, 1)
        T, B, _ = x.shape
        states = self._check_state(hx, B, batched, x, autocast)
        config = self._layer_config(x, B, T, lengths is not None, states)
        cast = None
        if autocast:
            # (torch takes other paths for a PackedSequence than for a tensor, and for unequal
            # lengths than for equal ones, and which depends on its version)
            packing = (
                "tensor" if lengths_cpu is None else "ragged" if lengths is not None else "packed"
            )
            structure = (self.proj_size > 0, self.bias, self.num_layers, self.bidirectional,
                         packing)  # fmt: skip
            cast, problem = _autocast_dtypes(_TORCH_KIND[self.mode], x, structure)
            config = dataclasses.replace(config, dtype=cast[0], torch_problem=problem)
        return x, lengths, lengths_cpu, batched, states, weights, cast, config

    def _explained(self, input, hx):
        return self._prepare(input, hx)[-2:]

    def choose_backend(self, input, hx=None) -> Choice:
        """Which backend a call with these arguments would run, and why others were skipped."""
        return choose(self.backend, self._explained(input, hx)[1], self.training)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        x, lengths, lengths_cpu, batched, states, weights, cast, config = self._prepare(input, hx)
        backend = select(self.backend, config, self.training)
        if backend == backends.TORCH:  # (under the caller's autocast, if any: as torch.nn)
            y, h_n = self._forward_torch(input, x, states, packed, weights)
        elif cast is None:
            y, h_n = self._forward_layers(x, states, lengths, backend, weights)
        else:  # autocast: the layers in the dtype torch.nn runs them in, autocast off inside
            run = cast[0]
            with torch.autocast(x.device.type, enabled=False):
                states = None if states is None else [t.to(run) for t in states]
                y, h_n = self._forward_layers(
                    x.to(run), states, lengths, backend, weights, run, cast[1:]
                )

        if packed:
            y_sorted = (
                y if input.sorted_indices is None else y.index_select(1, input.sorted_indices)
            )
            sorted_lengths = (
                lengths_cpu
                if input.sorted_indices is None
                else lengths_cpu[input.sorted_indices.cpu()]
            )
            data = pack_padded_sequence(y_sorted, sorted_lengths, enforce_sorted=True).data
            out = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        else:
            if self.batch_first:
                y = y.transpose(0, 1)
            out = y if batched else y.squeeze(1 if not self.batch_first else 0)
            if not batched:
                h_n = tuple(t.squeeze(1) for t in h_n)
        return out, (h_n if self.mode == "LSTM" else h_n[0])

    def _forward_layers(
        self,
        x: Tensor,
        states: list[Tensor] | None,
        lengths: Tensor | None,
        backend: str,
        weights: list[Tensor],
        weight_dtype: torch.dtype | None = None,
        state_dtypes: tuple[torch.dtype, ...] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """All layers and directions through the per-layer op. ``x`` is ``[T, B, I]``;
        ``weights``: those of ``_flat_weights_names``; ``weight_dtype``: the parameters cast
        to it (autocast), else as they are; ``state_dtypes``: those of the final states
        (autocast), else ``x``'s."""

        def param(t: Tensor) -> Tensor:
            return t if weight_dtype is None else t.to(weight_dtype)

        T, B, _ = x.shape
        acc = state_dtype(x.dtype)
        D = 2 if self.bidirectional else 1
        P = self.proj_size or self.hidden_size
        lstm = self.mode == "LSTM"
        if states is None:
            h0 = x.new_zeros(self.num_layers * D, B, P, dtype=acc)
            c0 = x.new_zeros(self.num_layers * D, B, self.hidden_size, dtype=acc) if lstm else None
        else:
            h0 = states[0].to(acc)
            c0 = states[1].to(acc) if lstm else None
        h_finals, c_finals = [], []
        layer_in = x
        # weights: each layer and direction's group in turn (_weight_groups' order), the
        # group's weights in torch.nn's order w_ih, w_hh[, b_ih, b_hh][, w_hr]
        per_group = len(weights) // (self.num_layers * D)
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                group = weights[k * per_group : (k + 1) * per_group]
                w_ih, w_hh = param(group[0]), param(group[1])
                b_ih = param(group[2]) if self.bias else None
                b_hh = param(group[3]) if self.bias else None
                w_hr = param(group[-1]) if self.proj_size else None
                gx = input_projection(layer_in, w_ih, b_ih, backend)
                y, h_n, c_n = layer_recurrence(
                    self._cell,
                    gx,
                    h0[k].contiguous(),
                    c0[k].contiguous() if lstm else None,
                    w_hh.contiguous(),
                    b_hh,
                    w_hr.contiguous() if w_hr is not None else None,
                    lengths,
                    direction == 1,
                    backend,
                )
                outs.append(y)
                h_finals.append(h_n)
                if lstm:
                    c_finals.append(c_n)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = torch.nn.functional.dropout(layer_in, self.dropout, training=True)
        dtypes = state_dtypes or (x.dtype, x.dtype)
        h_n = torch.stack(h_finals).to(dtypes[0])
        finals = (h_n, torch.stack(c_finals).to(dtypes[1])) if lstm else (h_n,)
        return layer_in, finals

    def _forward_torch(
        self, input, x: Tensor, states: list[Tensor] | None, packed: bool, weights: list[Tensor]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """torch.nn's own fused implementation (cuDNN / oneDNN), for ``backend="torch"``, on
        ``weights`` (those of ``_flat_weights_names``).

        Returns ``y [T, B, D*P]`` padded in the caller's batch order and the final states.
        """
        T, B, _ = x.shape
        D = 2 if self.bidirectional else 1
        P = self.proj_size or self.hidden_size
        if states is None:
            states = [x.new_zeros(self.num_layers * D, B, P)]
            if self.mode == "LSTM":
                states.append(x.new_zeros(self.num_layers * D, B, self.hidden_size))
        args = (
            weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
        )
        impl = {
            "LSTM": _VF.lstm,
            "GRU": _VF.gru,
            "RNN_TANH": _VF.rnn_tanh,
            "RNN_RELU": _VF.rnn_relu,
        }[self.mode]
        hx = tuple(states) if self.mode == "LSTM" else states[0]
        if packed:
            if input.sorted_indices is not None:
                hx = (
                    tuple(t.index_select(1, input.sorted_indices) for t in hx)
                    if self.mode == "LSTM"
                    else hx.index_select(1, input.sorted_indices)
                )
            result = impl(input.data, input.batch_sizes, hx, *args)
            data, finals = result[0], result[1:]
            if input.unsorted_indices is not None:
                finals = tuple(t.index_select(1, input.unsorted_indices) for t in finals)
            y, _ = pad_packed_sequence(
                PackedSequence(
                    data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
                )
            )
            return y, tuple(finals)
        result = impl(x, hx, *args, False)
        return result[0], tuple(result[1:])


class LSTM(_RNNBase):
    """Drop-in ``torch.nn.LSTM``: same arguments, parameters and outputs, plus ``backend``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            backend,
        )


def _refuse_proj_size(proj_size) -> None:
    # torch.nn's GRU and RNN take the keyword only to refuse it (any value, 0 included)
    if proj_size is not None:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class GRU(_RNNBase):
    """Drop-in ``torch.nn.GRU``: same arguments, parameters and outputs, plus ``backend``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        proj_size: int | None = None,
    ) -> None:
        _refuse_proj_size(proj_size)
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend,
        )


class RNN(_RNNBase):
    """Drop-in ``torch.nn.RNN`` (Elman, tanh or relu), plus ``backend``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        proj_size: int | None = None,
    ) -> None:
        _refuse_proj_size(proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        # (from the mode, fixed at construction: what the module computes, as in torch.nn,
        # whose RNN ignores a nonlinearity changed later)
        return s + (", nonlinearity='relu'" if self.mode == "RNN_RELU" else "")


# ------------------------------------------------------------------------------------ cells


_CELL_WEIGHTS = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
_CELL_BIASES = frozenset(("bias_ih", "bias_hh"))  # which torch.nn's cells take as None


class _CellBase(torch.nn.Module):
    _cell: str  # "lstm", "gru", "rnn_tanh" or "rnn_relu"

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        bias: bool,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # (0 allowed, as torch.nn's cells allow it: a 0-unit cell returns [B, 0] states)
        _check_int("input_size", input_size, 0)
        _check_int("hidden_size", hidden_size, 0)
        # (bias is not checked: torch.nn's cells take any truthy value, bias=1 included, and
        # so do these, so that rnnkern.convert takes every cell torch.nn builds)
        if dtype is not None and dtype not in _FLOATS:
            raise ValueError(f"dtype must be a floating dtype {_FLOATS}, got {dtype}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backends.check_name(backend)
        G = gate_count(cell)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = Parameter(torch.empty((G * hidden_size, input_size), **factory))
        self.weight_hh = Parameter(torch.empty((G * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = Parameter(torch.empty(G * hidden_size, **factory))
            self.bias_hh = Parameter(torch.empty(G * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._weight_shapes()  # (cached now, as the sequence modules' are)
        self.reset_parameters()

    __prepare_scriptable__ = _refuse_script

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    def _weight_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of ``_CELL_WEIGHTS``' weights (computed once; see _RNNBase's)."""
        shapes = self.__dict__.get("_cell_weight_shapes")
        if shapes is None:
            GH = gate_count(self._cell) * self.hidden_size
            shapes = [(GH, self.input_size), (GH, self.hidden_size), (GH,), (GH,)]
            self.__dict__["_cell_weight_shapes"] = shapes
        return shapes

    def _prepare(self, input: Tensor, hx) -> tuple[Tensor, list[Tensor], list, bool]:
        """Checks a call's arguments: ``(x [B, I], states, weights, batched)``, ``weights``
        those of ``_CELL_WEIGHTS``, read once for the call."""
        n_states = 2 if self._cell == "lstm" else 1  # (h, c) or h
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise RNNInputTypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        autocast = _autocast_on(input)  # (torch.nn casts mismatched dtypes then; so does _run)
        if input.dim() not in (1, 2):
            raise RNNInputError(
                f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        weights = _check_weights(
            self, _CELL_WEIGHTS, self._weight_shapes(), input, autocast, _CELL_BIASES
        )
        if input.shape[-1] != self.input_size:
            raise RNNInputError(
                f"{name}: input has inconsistent input_size: got {input.shape[-1]} expected "
                f"{self.input_size}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if hx is None:
            states = [x.new_zeros(B, self.hidden_size) for _ in range(n_states)]
        else:
            given = list(hx) if n_states == 2 else [hx]
            if n_states == 2 and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise RNNInputTypeError(f"{name}: hx must be a tuple (h, c) of two tensors")
            states = []
            for i, t in enumerate(given):
                label = f"hx[{i}]" if n_states == 2 else "hx"
                if not isinstance(t, Tensor):
                    raise RNNInputTypeError(
                        f"{name}: {label} must be a Tensor, got {type(t).__name__}"
                    )
                if t.dim() != input.dim():
                    raise RNNInputError(
                        f"{name}: Expected {label} to be {input.dim()}D like the input, got "
                        f"{t.dim()}D instead"
                    )
                t = t if batched else t.unsqueeze(0)
                if tuple(t.shape) != (B, self.hidden_size):
                    raise RNNInputError(
                        f"{name}: {label} must have shape {[B, self.hidden_size]}, got {_shape(t)}"
                    )
                if (t.dtype != x.dtype and not autocast) or t.device != x.device:
                    raise RNNInputError(
                        f"{name}: {label} must be {x.dtype} on {x.device} like the input, got "
                        f"{t.dtype} on {t.device}"
                    )
                states.append(t)
        return x, states, weights, batched

    def _config(self, x: Tensor, states: list[Tensor]):
        """``(cast, config)`` of a step on ``x [B, I]``: ``cast`` as in :meth:`_RNNBase._prepare`,
        ``config`` the step as a one-step layer."""
        grad = needs_grad((x,), self.parameters(), states)
        structure = (False, self.bias, 1, False, "tensor")
        cast, problem = _autocast_dtypes(_TORCH_KIND[self._cell], x, structure)
        config = LayerConfig(
            self._cell,
            x.device.type,
            x.dtype if cast is None else cast[0],
            self.input_size,
            self.hidden_size,
            0,
            x.shape[0],
            1,
            False,
            grad,
            problem,
        )
        return cast, config

    def _explained(self, input, hx):
        x, states, _, _ = self._prepare(input, hx)
        return self._config(x, states)

    def choose_backend(self, input, hx=None) -> Choice:
        """Which backend a call with these arguments would run, and why others were skipped."""
        return choose(self.backend, self._explained(input, hx)[1], self.training)

    def _run(self, x: Tensor, states: list[Tensor], weights: list) -> tuple[Tensor, ...]:
        """One step on ``weights`` (``_CELL_WEIGHTS``', from :meth:`_prepare`)."""
        cast, config = self._config(x, states)
        backend = select(self.backend, config, self.training, torch_vmaps=True)
        if backend == backends.TORCH:  # (under the caller's autocast, if any: as torch.nn)
            args = (x, states[0] if len(states) == 1 else tuple(states), *weights)
            if self._cell == "lstm":
                return tuple(_VF.lstm_cell(*args))
            impl = {
                "gru": _VF.gru_cell,
                "rnn_tanh": _VF.rnn_tanh_cell,
                "rnn_relu": _VF.rnn_relu_cell,
            }[self._cell]
            return (impl(*args),)
        if cast is None:
            return self._run_kernel(x, states, weights, backend, None, None)
        run = cast[0]
        with torch.autocast(x.device.type, enabled=False):  # in torch.nn's dtypes
            states = [t.to(run) for t in states]
            return self._run_kernel(x.to(run), states, weights, backend, run, cast)

    def _run_kernel(
        self,
        x: Tensor,
        states: list[Tensor],
        weights: list,
        backend: str,
        weight_dtype: torch.dtype | None,
        out_dtypes: tuple[torch.dtype, ...] | None,
    ) -> tuple[Tensor, ...]:
        """One step on a kernel backend; ``weight_dtype``: the parameters cast to it;
        ``out_dtypes``: those of h (and c), else ``x``'s."""

        def param(t: Tensor | None) -> Tensor | None:
            return t if t is None or weight_dtype is None else t.to(weight_dtype)

        w_ih, w_hh, b_ih, b_hh = weights
        acc = state_dtype(x.dtype)
        gx = torch.nn.functional.linear(x, param(w_ih), param(b_ih)).unsqueeze(0)
        _, h, c = layer_recurrence(
            self._cell,
            gx.contiguous(),
            states[0].to(acc).contiguous(),
            states[1].to(acc).contiguous() if self._cell == "lstm" else None,
            param(w_hh).contiguous(),
            param(b_hh),
            None,
            None,
            False,
            backend,
        )
        dtypes = out_dtypes or (x.dtype, x.dtype)
        return (h.to(dtypes[0]), c.to(dtypes[1])) if self._cell == "lstm" else (h.to(dtypes[0]),)


class LSTMCell(_CellBase):
    """Drop-in ``torch.nn.LSTMCell``, plus ``backend``."""

    _cell = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype, backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        x, states, weights, batched = self._prepare(input, hx)
        h, c = self._run(x, states, weights)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """Drop-in ``torch.nn.GRUCell``, plus ``backend``."""

    _cell = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__("gru", input_size, hidden_size, bias, device, dtype, backend)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, states, weights, batched = self._prepare(input, hx)
        (h,) = self._run(x, states, weights)
        return h if batched else h.squeeze(0)


class RNNCell(_CellBase):
    """Drop-in ``torch.nn.RNNCell`` (tanh or relu), plus ``backend``."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            f"rnn_{nonlinearity}", input_size, hidden_size, bias, device, dtype, backend
        )

    @property
    def _cell(self) -> str:
        # Read at every call, as torch.nn.RNNCell reads its nonlinearity.
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCell: unknown nonlinearity {self.nonlinearity!r}; select from 'tanh' or 'relu'"
            )
        return f"rnn_{self.nonlinearity}"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, states, weights, batched = self._prepare(input, hx)
        (h,) = self._run(x, states, weights)
        return h if batched else h.squeeze(0)


_AUTOCAST_DTYPES: dict[tuple, tuple[torch.dtype, ...]] = {}
# The probes torch.nn failed (same keys): why, in a sentence that names torch's error.
_AUTOCAST_FAILURES: dict[tuple, str] = {}


# Under torch.compile this runs once at trace time and its answer is a constant (the probe
# builds a module, which dynamo cannot trace).
@torch._dynamo.assume_constant_result
def _torch_autocast_dtypes(
    kind: str, device_type: str, dtype: torch.dtype, fast: torch.dtype, structure: tuple
) -> tuple[torch.dtype, ...]:
    """The dtypes of what torch.nn's ``kind`` (``"LSTM"``, ``"GRUCell"``, ...) returns under
    ``torch.autocast(device_type, dtype=fast)`` with parameters of ``dtype`` (y, h_n[, c_n];
    a cell's h[, c]), probed once on a two-unit module of that kind and ``structure``
    (:func:`_autocast_dtypes`); the first is the one it computes in (a projected LSTM returns
    its c_n in float32 on the CPU, its y and h_n in bfloat16). torch
    casts some recurrent ops and not others (on the CPU the oneDNN LSTM, the Elman RNN and
    RNNCell, not the GRU, the LSTM/GRU cells, a projected LSTM nor one over a PackedSequence of
    unequal lengths, which oneDNN does not run, nor, in torch 2.11, one over any
    PackedSequence; on CUDA, by its autocast lists, the cuDNN RNNs and the cells), and the list
    is torch's own, so it is asked rather than copied.

    Where torch.nn itself fails under float16 autocast (the CPU's oneDNN LSTM has no float16
    primitive on CPUs without native float16 arithmetic: "could not create a primitive
    descriptor", as in a plain torch.nn.LSTM call), the answer is bfloat16's with float16 for
    bfloat16: torch casts by one list of ops for both 16-bit dtypes (its AutocastCPU kernels
    cast to whichever ``get_autocast_dtype`` gives), so that is what torch.nn would return if
    the primitive existed, and rnnkern's kernels run it. The failure is kept
    (:data:`_AUTOCAST_FAILURES`), so that ``auto`` does not choose torch.nn's path for it and
    ``backend="torch"`` says why it cannot."""
    key = (kind, device_type, dtype, fast, structure)
    if key not in _AUTOCAST_DTYPES:
        proj, bias, layers, bidirectional, packing = structure
        kwargs: dict = {"bias": bias}
        sequence = not kind.endswith("Cell")
        if sequence:
            kwargs.update(num_layers=layers, bidirectional=bidirectional)
        if proj:
            kwargs["proj_size"] = 1
        probe = getattr(torch.nn, kind)(2, 2, **kwargs).to(device=device_type, dtype=dtype)
        x = torch.zeros((2, 2, 2) if sequence else (1, 2), device=device_type, dtype=dtype)
        if packing != "tensor":  # two sequences, of lengths 2 and 1 when ragged
            x = pack_padded_sequence(x, torch.tensor([2, 1] if packing == "ragged" else [2, 2]))
        try:
            with torch.no_grad(), torch.autocast(device_type, dtype=fast):
                out = probe(x)
        except RuntimeError as err:
            if fast != torch.float16:
                raise
            as_bf16 = _torch_autocast_dtypes(kind, device_type, dtype, torch.bfloat16, structure)
            _AUTOCAST_FAILURES[key] = (
                f"torch.nn's {kind} fails under float16 autocast on {device_type} here "
                f"({type(err).__name__}: {backends.first_line(err)})"
            )
            _AUTOCAST_DTYPES[key] = tuple(
                torch.float16 if d == torch.bfloat16 else d for d in as_bf16
            )
            return _AUTOCAST_DTYPES[key]
        if sequence:  # (y, h_n) or (y, (h_n, c_n))
            y, finals = out
            out = (
                y.data if packing != "tensor" else y,
                *(finals if isinstance(finals, tuple) else (finals,)),
            )
        elif isinstance(out, Tensor):
            out = (out,)
        _AUTOCAST_DTYPES[key] = tuple(t.dtype for t in out)
    return _AUTOCAST_DTYPES[key]


# torch.nn's class for a sequence module's mode or a cell's cell name
_TORCH_KIND = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN",
               "lstm": "LSTMCell", "gru": "GRUCell",
               "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}  # fmt: skip


# A constant of the device type; under torch.compile it is asked once at trace time (dynamo
# cannot trace torch.amp.is_autocast_available in torch 2.11).
@torch._dynamo.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (never for types torch has no autocast
    for, e.g. "meta", whose is_autocast_enabled raises)."""
    device_type = x.device.type
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_dtypes(
    kind: str, x: Tensor, structure: tuple
) -> tuple[tuple[torch.dtype, ...] | None, str]:
    """``(None, "")`` unless autocast is on for ``x``'s device type; then the dtypes of what
    torch.nn's ``kind`` would return for this call (:func:`_torch_autocast_dtypes`): rnnkern
    runs its kernels in the first (``x``'s dtype when torch does not cast) with autocast off
    inside, and returns torch.nn's dtypes; and why torch.nn's own path fails for the call, if
    its probe failed (:data:`_AUTOCAST_FAILURES`; not asked while compiling, where that path
    cannot run anyway), else "". ``structure``: (has a projection, bias, layers,
    bidirectional, the input's packing: ``"tensor"``, ``"packed"`` (a PackedSequence of equal
    lengths) or ``"ragged"`` (unequal)), the call's features that decide torch's path and so
    its casts; the probe has them. (A first call under autocast builds a small torch.nn module
    to ask; warm up before capturing a CUDA graph.)"""
    if not _autocast_on(x):
        return None, ""
    device_type = x.device.type
    key = (kind, device_type, x.dtype, torch.get_autocast_dtype(device_type), structure)
    dtypes = _torch_autocast_dtypes(*key)
    problem = "" if torch.compiler.is_compiling() else _AUTOCAST_FAILURES.get(key, "")
    return dtypes, problem


def explain(module: torch.nn.Module, input, hx=None) -> str:
    """Which backend ``module(input, hx)`` would run, and why the others were skipped; under
    autocast, the dtype the layers run in; for a backend that plans its launches (``cuda``),
    the plan of each layer's kernels too."""
    if not isinstance(module, (_RNNBase, _CellBase)):
        raise TypeError(
            f"module must be an rnnkern LSTM, GRU, RNN or cell, got {type(module).__name__}"
        )
    cast, config = module._explained(input, hx)  # (once: as choose_backend, with the cast)
    choice = choose(module.backend, config, module.training)
    text = str(choice)
    if cast is not None:
        text += f"\n  under autocast: runs in {cast[0]}, as torch.nn would for this call"
    kernel = None if choice.backend == backends.TORCH else backends.get_backend(choice.backend)
    describe = getattr(kernel, "describe", None)
    if describe is not None:
        text += "\n" + "\n".join("  " + line for line in describe(config).splitlines())
    return text
