"""How rnnkern registers its torch operators: schema, kernel, fake kernel, autograd formula.

It does what ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd`` does,
through the lower-level ``torch.library.Library``, with less Python per call. custom_op wraps
every call in about ten Python frames: its autograd wrapper, the schema's default arguments
filled in anew (quadratic in the argument count: ``rnnkern::layer_forward`` has 11), a
dynamo-disable wrapper and an aliasing check. Medians of 3 interleaved runs of both versions
(one GRU layer of 1x64, B=1, T=1, backend ``cpu``, 1 thread, 2-core x86-64, torch 2.13),
against the backend's own Python and kernels, 33-36 us forward and 89-103 us both ways:

=============================================  ============  ===========
call                                           custom_op     this module
=============================================  ============  ===========
``layer_forward`` with gradients               110-128 us    63-64 us
``layer_forward`` + ``backward()``             334-409 us    256-260 us
``layer_forward`` without gradients            53-54 us      45 us
``rnnkern.GRU`` 1x64 T=1 forward + backward     495-523 us    410-422 us
=============================================  ============  ===========

(torch.nn.GRU: 244-254 us for the last.) The formula is an old-style
``torch.autograd.Function`` (``forward(ctx, ...)``): one with a separate ``setup_context``
makes ``Function.apply`` bind its arguments through ``inspect.signature`` on every call (35 us
here). Calls that need no gradient skip the Function and go straight to the kernel, as
custom_op's do.

The operators trace and compile as custom_op's do: torch.compile and torch.export see one
opaque operator with a fake kernel, and AOTAutograd traces the formula into the backward graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NAMESPACE = "rnnkern"

_LIB = torch.library.Library(NAMESPACE, "DEF")


def _requires_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def define(
    name: str,
    kernel: Callable,
    fake: Callable,
    backward: Callable,
    setup_context: Callable | None = None,
) -> torch._ops.OpOverload:
    """Register ``rnnkern::<name>`` and return it; its schema is read from ``kernel``'s type
    annotations (``torch.library.infer_schema``, as custom_op reads it; no argument mutated).

    ``kernel(*args)`` computes it on real tensors of any device (``CompositeExplicitAutograd``;
    the backends dispatch on the device themselves), ``fake(*args)`` its outputs' shapes and
    dtypes (meta and fake tensors). Where gradients are needed, ``setup_context(ctx, args,
    output)`` keeps what ``backward(ctx, *grads)`` needs; ``backward`` returns one gradient
    (or None) per argument. In autograd's graph the node is ``rnnkern_<name>Backward``.
    """
    _LIB.define(name + torch.library.infer_schema(kernel, mutates_args=()))
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        return output

    formula = type(
        f"{NAMESPACE}_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def autograd_kernel(*args):
        if _requires_grad(args):
            return formula.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _LIB.impl(name, autograd_kernel, "Autograd")
    return op
