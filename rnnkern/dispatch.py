"""Choosing a backend for a module call: ``backend="auto"``, names, and ``RNNKERN_BACKEND``.

``auto`` tries rnnkern's fused kernels in order of measured speed for the device, keeps those
that support the configuration and are faster than torch.nn there, and otherwise runs
torch.nn's own fused implementation (``torch``: cuDNN or oneDNN), so what ``auto`` runs is never
slower than the module it replaces. The choosing itself costs some microseconds a call, which
shows on the smallest calls only (suite ``cpu_short``'s ``rnnkern[auto]`` column: where ``auto``
keeps torch.nn's path, 0.68-1.02x torch.nn's speed, median 0.94x, except the cells and single
steps of 1x64 layers, 0.48-0.96x; the Decoder is the way to step small models).

Where torch.nn's path cannot run (inside ``torch.compile``, where it would break the graph;
under ``torch.func.vmap``; backward in eval mode on cuDNN), ``auto`` runs the fastest fused
kernel that supports the call, or ``reference`` when none does, and warns once, saying what
and why. Under torch.func's ``grad`` and ``jvp`` transforms, where rnnkern's operators cannot
run, ``auto`` runs torch.nn's path and a named kernel backend is an error.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch

from . import backends
from .backends import KERNEL_BACKENDS, TORCH, BackendUnavailableError
from .backends.base import LayerConfig

ENV_VAR = "RNNKERN_BACKEND"

# Fused kernels ``auto`` considers on each device type, fastest first.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


@dataclass
class Choice:
    backend: str
    reason: str
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend {self.backend!r}: {self.reason}"]
        lines += [f"  skipped {name!r}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _torch_path_problem(
    config: LayerConfig, training: bool, compiling: bool, transforms: str = ""
) -> str | None:
    """Why torch.nn's own fused path cannot run this call, or None."""
    if config.torch_problem:
        return config.torch_problem
    if compiling:
        return "torch.nn's RNN ops break the graph under torch.compile"
    if "vmap" in transforms:
        return "torch.nn's RNN ops have no batching rule for torch.func.vmap"
    if config.device_type == "cuda" and config.needs_grad and not training:
        return "cuDNN refuses RNN backward in eval mode"
    return None


# torch.func transforms under which rnnkern's operators cannot run: their autograd formula is
# an autograd.Function without a separate setup_context, which these transforms require (as
# torch's own custom_op's is: pytorch issues 168393 and 179652). A formula with one would cost
# 35 us a call in Function.apply's inspect.signature (rnnkern.torch_ops). vmap alone runs them
# (one call per batch entry) and torch.nn's RNN ops do not run under it at all.
_KERNELS_REFUSED = ("grad", "jvp", "functionalize")


def _kernel_path_problem(transforms: str) -> str | None:
    """Why no rnnkern operator can run this call, or None."""
    refused = [t for t in transforms.split(",") if t in _KERNELS_REFUSED]
    if refused:
        return (
            f"rnnkern's operators cannot run under torch.func's {refused[0]} transform (their "
            "autograd formula has no separate setup_context, which it needs; see "
            "rnnkern.torch_ops)"
        )
    return None


def functorch_transforms() -> str:
    """The torch.func transforms active around the call, outermost first, as a comma-separated
    string ('grad', 'vmap,grad', ...; '' outside any)."""
    if torch._C._functorch.peek_interpreter_stack() is None:  # (the common case: 0.1 us a call)
        return ""
    from torch._functorch import pyfunctorch

    interpreters = pyfunctorch.retrieve_all_functorch_interpreters()
    return ",".join(i.key().name.lower() for i in interpreters)


def _faster_than_torch(name: str, config: LayerConfig) -> bool | str:
    backend = backends.get_backend(name)
    judge = getattr(backend, "faster_than_torch", None)
    if judge is None:
        return "no measurements show it faster than torch.nn for this configuration"
    return judge(config)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def choose(
    requested: str,
    config: LayerConfig,
    training: bool,
    compiling: bool = False,
    transforms: str = "",
) -> Choice:
    """The backend to run ``config`` with. ``requested`` is 'auto' or a backend name; the
    environment variable ``RNNKERN_BACKEND``, when set, overrides it. ``compiling`` says the
    call is being traced by torch.compile; ``transforms``, the torch.func transforms around it
    (:func:`functorch_transforms`)."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        backends.check_name(forced, argument=f"environment variable {ENV_VAR}")
        requested = forced
    if config.batch_size == 0:
        # torch.nn returns empty outputs and states (their autograd graph included) for an
        # empty batch; there is nothing for a kernel to compute, so torch.nn's op makes them.
        return Choice(TORCH, "an empty batch: nothing to compute, torch.nn's op returns it")
    if config.hidden_size == 0:  # (a cell of 0 units, which torch.nn builds: [B, 0] states)
        return Choice(TORCH, "0 hidden units: nothing to compute, torch.nn's op returns it")
    symbolic = config.batch_size < 0 or config.seq_len < 0  # (see select)
    # supports() does not depend on B or T, and gets real sizes, never -1: backend cuda caches
    # its answer per layer shape without B, and its plan for B = -1 would be an error.
    asked = dataclasses.replace(config, batch_size=1, seq_len=1) if symbolic else config
    if requested == TORCH:
        problem = _torch_path_problem(config, training, compiling, transforms)
        if problem:
            raise BackendUnavailableError(f"backend 'torch' cannot run this call: {problem}")
        return Choice(TORCH, "asked for by name")
    refused = _kernel_path_problem(transforms)
    if refused:
        if requested in KERNEL_BACKENDS:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run this call: {refused}; backend 'torch' "
                "or 'auto' can"
            )
        return Choice(TORCH, f"{refused}; torch.nn's path can")
    if requested in KERNEL_BACKENDS:
        ok = backends.supports(requested, asked)
        if ok is not True:
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run this configuration: {ok}"
            )
        return Choice(requested, "asked for by name")

    skipped: dict[str, str] = {}
    slower: list[str] = []  # supported, but not measured faster than torch.nn
    for name in AUTO_ORDER.get(config.device_type, ()):
        ok = backends.supports(name, asked)
        if ok is not True:
            skipped[name] = ok
            continue
        if symbolic:
            return Choice(name, f"{SYMBOLIC_SIZES}: the first fused kernel that supports it",
                          skipped)  # fmt: skip
        faster = _faster_than_torch(name, config)
        if faster is not True:
            skipped[name] = faster
            slower.append(name)
            continue
        return Choice(name, "fastest fused kernel that supports this configuration", skipped)
    problem = _torch_path_problem(config, training, compiling, transforms)
    if problem is None:
        return Choice(TORCH, "no rnnkern kernel is faster here; torch.nn's fused path", skipped)
    what = f"{config.cell} on {config.device_type} ({config.dtype})"
    if slower:
        name = slower[0]
        _warn_once(
            f"rnnkern: running backend {name!r} for {what}, which was not measured faster than "
            f"torch.nn there ({skipped[name]}), because {problem}"
        )
        return Choice(name, f"{problem}; the fastest fused kernel that supports it", skipped)
    why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no fused kernel for this device"
    _warn_once(
        f"rnnkern: running the slow 'reference' backend for {what} because {problem} and no "
        f"fused kernel applies ({why})"
    )
    return Choice("reference", f"{problem}; no fused kernel applies", skipped)


_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def _backend_name(
    requested: str,
    cell: str,
    device_type: str,
    dtype_name: str,
    input_size: int,
    hidden_size: int,
    proj_size: int,
    batch_size: int,
    seq_len: int,
    has_lengths: bool,
    needs_grad: bool,
    training: bool,
    compiling: bool,
    transforms: str,
) -> str:
    # Runs eagerly even under torch.compile (its result is a trace-time constant), so the
    # registry's imports, the environment and the warning stay out of the graph. Plain
    # arguments only: assume_constant_result cannot take dtypes or dataclasses.
    config = LayerConfig(
        cell,
        device_type,
        getattr(torch, dtype_name),
        input_size,
        hidden_size,
        proj_size,
        batch_size,
        seq_len,
        has_lengths,
        needs_grad,
    )
    return choose(requested, config, training, compiling, transforms).backend


# What ``torch.compiler.assume_constant_result`` does (it only sets this attribute), without
# importing torch._dynamo at ``import rnnkern`` time: that import alone took 3 s of the 5 s
# ``import rnnkern`` took here. test_compile_dispatch.py fails if torch ever changes the marker.
_backend_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


# Under torch.compile the batch and time sizes may be symbolic (dynamic=True, or the automatic
# dynamic shapes of a recompile after a size changed): they cannot be arguments of
# _backend_name (assume_constant_result needs constants: fullgraph=True failed on the second
# batch size), and dynamo's isinstance cannot tell them from ints, so while compiling select
# passes -1 for both, and auto takes the first fused kernel that supports the call. The sizes
# only steer speed: no backend's supports() depends on B or T, and torch.nn's path cannot run
# while compiling anyway.
SYMBOLIC_SIZES = "the call is being compiled, and its batch and time sizes may be symbolic"


def select(requested: str, config: LayerConfig, training: bool, torch_vmaps: bool = False) -> str:
    """The name of the backend to run ``config`` with (see :func:`choose`); safe to call
    inside code that torch.compile traces. ``torch_vmaps``: torch.nn's op for this call runs
    under torch.func.vmap (the cells' ops do; the sequence modules' ``aten::lstm`` and kin do
    not)."""
    compiling = torch.compiler.is_compiling()
    transforms = "" if compiling else functorch_transforms()
    if torch_vmaps:
        transforms = ",".join(t for t in transforms.split(",") if t != "vmap")
    if not compiling:  # (eagerly, without taking the config apart and building it again)
        return choose(requested, config, training, False, transforms).backend
    return _backend_name(
        requested,
        config.cell,
        config.device_type,
        _DTYPE_NAMES[config.dtype],
        config.input_size,
        config.hidden_size,
        config.proj_size,
        -1 if compiling and config.batch_size != 0 else config.batch_size,
        -1 if compiling else config.seq_len,
        config.has_lengths,
        config.needs_grad,
        training,
        compiling,
        transforms,
    )
