"""Swap torch.nn's recurrent modules for rnnkern's inside a model you did not write, and back.

``rnnkern.convert(model)`` replaces every ``torch.nn.LSTM/GRU/RNN`` and cell in ``model`` (and
``model`` itself, if it is one) with rnnkern's module of the same configuration. The new
modules take over the old ones' ``Parameter`` objects, so nothing is copied, outputs and
``state_dict`` stay the same, and an optimizer built before the swap keeps training the same
tensors. ``convert(model, to="torch")`` does the reverse, for what only torch.nn's classes
support (``torch.jit.script``).

What the replaced module carried besides its parameters moves with them: its hooks (forward,
backward, state_dict and load_state_dict hooks; inside a model the same hook tables, so handles
from ``register_forward_hook`` and the like still remove them; a module converted on its own
keeps its hooks, and its replacement gets copies) and the attributes set on it after
construction. A module held under several names (or by several parents) becomes one new module,
held under all of them. Subclasses of torch.nn's classes are left as they are, with a warning:
their own code may change what forward does.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.modules.module import _WrappedHook

from . import nn as rk
from .backends import check_name

__all__ = ["convert"]

# torch.nn class -> rnnkern class, and back. One table for both directions.
_PAIRS = [
    (torch.nn.LSTM, rk.LSTM),
    (torch.nn.GRU, rk.GRU),
    (torch.nn.RNN, rk.RNN),
    (torch.nn.LSTMCell, rk.LSTMCell),
    (torch.nn.GRUCell, rk.GRUCell),
    (torch.nn.RNNCell, rk.RNNCell),
]
_TARGETS = {"rnnkern": dict(_PAIRS), "torch": {ours: theirs for theirs, ours in _PAIRS}}
# A module's hook tables, moved to its replacement (those of torch.nn.Module, torch 2.11+).
_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip
# and the flag that says which kind its backward hooks are (register_full_backward_hook)
_HOOK_FLAGS = ("_is_full_backward_hook",)


def _arguments(module: torch.nn.Module) -> dict:
    """The constructor arguments that rebuild ``module`` (either library's class)."""
    args = dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
    if hasattr(module, "num_layers"):  # a sequence module
        args.update(
            num_layers=module.num_layers,
            batch_first=module.batch_first,
            dropout=float(module.dropout),
            bidirectional=module.bidirectional,
        )
        if module.mode == "LSTM":
            args["proj_size"] = module.proj_size
        elif module.mode.startswith("RNN_"):
            args["nonlinearity"] = module.mode[4:].lower()
    elif hasattr(module, "nonlinearity"):  # RNNCell
        args["nonlinearity"] = module.nonlinearity
    return args


def _move_hooks(old: torch.nn.Module, new: torch.nn.Module, share: bool) -> None:
    """Give ``new`` the hooks of ``old``: its very tables where ``share`` (``old`` leaves the
    model: a RemovableHandle finds its hook through a reference to the table, so handles still
    remove them), else copies (``old`` stays in use, with its own). A hook that torch calls with
    the module it was registered on, through a weak reference (load_state_dict pre-hooks), is
    bound to ``new`` (bound to ``old``, it would get the replaced module, or fail once that is
    freed: "the hook of a dead Module")."""
    for name in _HOOK_TABLES:
        table = getattr(old, name, None)
        if table is None:
            continue
        if not share:
            table = type(table)(table)
        for key, hook in list(table.items()):
            if isinstance(hook, _WrappedHook) and hook.with_module:
                table[key] = _WrappedHook(hook.hook, new)
        setattr(new, name, table)
    for name in _HOOK_FLAGS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))


def _swap(
    module: torch.nn.Module, cls: type, backend: str | None, share_hooks: bool
) -> torch.nn.Module:
    if torch.nn.utils.parametrize.is_parametrized(module):
        raise ValueError(
            f"convert: {type(module).__name__} has parametrizations (weight_norm, ...); convert "
            "the model before adding them"
        )
    extra = {} if backend is None else {"backend": backend}
    new = cls(**_arguments(module), device="meta", **extra)  # (no weights drawn, none kept)
    params = dict(module.named_parameters(recurse=False))
    wanted = [name for name, _ in new.named_parameters(recurse=False)]
    buffers = [name for name, _ in module.named_buffers(recurse=False)]
    if sorted(params) != sorted(wanted) or buffers:
        # torch.nn.utils.prune and the old weight_norm rename a weight (weight_hh_l0_orig,
        # weight_hh_l0_g/_v), add buffers and recompute it in a forward pre-hook, which the new
        # module would not run: its weight would stay on the meta device.
        raise ValueError(
            f"convert: {type(module).__name__} does not hold torch.nn's own parameters "
            f"(expected {wanted}, got {sorted(params)}"
            + (f" and buffers {buffers}" if buffers else "")
            + "): a hook-based reparametrization (torch.nn.utils.prune, the old weight_norm) "
            "recomputes its weights; convert the model before adding it, or remove it first"
        )
    for name in wanted:
        setattr(new, name, params[name])
    _move_hooks(module, new, share_hooks)
    # Attributes a fresh module of the old one's class would not have: set after construction
    # by the model's code. (The fresh module's warnings, e.g. dropout with one layer, were
    # given when the old one was built.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = type(module)(**_arguments(module), device="meta").__dict__
    for key, value in module.__dict__.items():
        if key not in fresh and key not in new.__dict__:
            new.__dict__[key] = value
    new.train(module.training)
    if hasattr(new, "flatten_parameters"):  # sequence modules: cuDNN's layout on CUDA
        new.flatten_parameters()
    return new


def convert(module: torch.nn.Module, to: str = "rnnkern", backend: str = "auto") -> torch.nn.Module:
    """Replace the recurrent modules inside ``module`` (in place) and return the result.

    Args:
        module: any ``torch.nn.Module``; when it is itself an RNN or a cell, the returned
            module is its replacement (``module`` is left as it was, with its hooks; the
            replacement gets copies of them).
        to: ``"rnnkern"`` (torch.nn's LSTM, GRU, RNN and cells become rnnkern's) or
            ``"torch"`` (rnnkern's become torch.nn's).
        backend: the new rnnkern modules' ``backend`` (``to="rnnkern"`` only).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to must be 'rnnkern' or 'torch', got {to!r}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert: module must be a torch.nn.Module, got {type(module).__name__}")
    if to == "torch" and backend != "auto":
        raise ValueError(f"convert: backend applies to to='rnnkern' only, got {backend!r}")
    check_name(backend)
    table = _TARGETS[to]
    chosen = backend if to == "rnnkern" else None

    # id of a module seen -> its replacement, or None where it stays (a module held under
    # several names is replaced, or warned about, once)
    done: dict[int, torch.nn.Module | None] = {}

    def replacement(m: torch.nn.Module, in_place: bool) -> torch.nn.Module | None:
        if id(m) in done:
            return done[id(m)]
        # Exact types (a subclass may change what forward does), seen through the class that
        # parametrizations substitute, so that those are refused rather than skipped.
        kind = torch.nn.utils.parametrize.type_before_parametrizations(m)
        cls = table.get(kind)
        new = None
        if cls is not None:
            new = _swap(m, cls, chosen, share_hooks=in_place)
        else:
            base = next((t for t in table if issubclass(kind, t)), None)
            if base is not None:
                warnings.warn(
                    f"convert: left {kind.__name__} as it is: it subclasses "
                    f"{base.__module__}.{base.__name__}, and its own code may change what "
                    "forward does",
                    stacklevel=3,
                )
        done[id(m)] = new
        return new

    top = replacement(module, in_place=False)
    if top is not None:
        return top
    # (every name of every parent: named_children() lists a module held twice once)
    found = [(p, n, c) for p in module.modules() for n, c in p._modules.items() if c is not None]
    for parent, name, child in found:
        new = replacement(child, in_place=True)
        if new is not None:
            setattr(parent, name, new)
    return module
