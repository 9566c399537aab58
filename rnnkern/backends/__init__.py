"""Backend registry: names, lazy imports, availability and the reasons a backend is skipped.

Backends are imported on first use, so ``import rnnkern`` never needs a compiled extension, a
GPU or Triton. A backend module exposes ``BACKEND``, an object implementing
:class:`rnnkern.backends.base.Backend`.
"""

from __future__ import annotations

import importlib

from .base import Backend, LayerConfig

# Kernel backends, each implementing the per-layer contract in ``base.py``.
KERNEL_BACKENDS = {
    "reference": "rnnkern.backends.reference",
    "cpu": "rnnkern.backends.cpu",
    "triton": "rnnkern.backends.triton",
    "cuda": "rnnkern.backends.cuda",
}
# ``torch`` is torch.nn's own fused implementation (cuDNN on CUDA, oneDNN or ATen on CPU),
# run for a whole module at once; it does not implement the per-layer contract.
TORCH = "torch"
ALL_BACKENDS = (*KERNEL_BACKENDS, TORCH)


def first_line(err: BaseException) -> str:
    """The first line of an error's text, else its type's name (torch's errors carry pages of
    advice after the line that says what happened)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed (torch's CPU allocator raises a plain
    RuntimeError, its CUDA one torch.OutOfMemoryError)."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here or cannot run this configuration."""


_loaded: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend object, or the reason it cannot be loaded."""
    if name not in _loaded:
        module_name = KERNEL_BACKENDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                _loaded[name] = f"backend {name!r} is not part of this version of rnnkern"
            else:
                _loaded[name] = f"backend {name!r} could not be imported: {err}"
        except ImportError as err:
            _loaded[name] = f"backend {name!r} could not be imported: {err}"
        else:
            backend = module.BACKEND
            ok = backend.available()
            _loaded[name] = backend if ok is True else f"backend {name!r}: {ok}"
    return _loaded[name]


def check_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str) or (name != "auto" and name not in ALL_BACKENDS):
        raise ValueError(
            f"{argument} must be 'auto' or one of {', '.join(map(repr, ALL_BACKENDS))}; "
            f"got {name!r}"
        )
    return name


def get_backend(name: str) -> Backend:
    """The kernel backend called ``name``; raises :class:`BackendUnavailableError` with the
    reason when it cannot run on this machine."""
    if name not in KERNEL_BACKENDS:
        check_name(name)
        raise ValueError(f"{name!r} is not a per-layer kernel backend")
    backend = _load(name)
    if isinstance(backend, str):
        raise BackendUnavailableError(backend)
    return backend


def unavailable_reason(name: str) -> str | None:
    """None when the kernel backend ``name`` can run on this machine, else why not."""
    backend = _load(name)
    return backend if isinstance(backend, str) else None


def supports(name: str, config: LayerConfig) -> bool | str:
    """True, or the reason backend ``name`` cannot run ``config``."""
    backend = _load(name)
    if isinstance(backend, str):
        return backend
    return backend.supports(config)


def available_backends(device="cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (a torch.device or string): none for
    a CUDA device where torch sees none."""
    import torch

    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        return []
    names = []
    for name in KERNEL_BACKENDS:
        backend = _load(name)
        if isinstance(backend, str):
            continue
        probe = LayerConfig("lstm", device_type, torch.float32, 8, 8, 0, 1, 1, False, True)
        if backend.supports(probe) is True:
            names.append(name)
    names.append(TORCH)
    return names
