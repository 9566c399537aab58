"""Persistent launches on the CPU: Triton's interpreter running a launch's programs at once.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a launch's programs one after another, so a
program that waits for the others at a grid-wide wait (the persistent mode, ``SPLIT=True``, of
:mod:`.common`) would wait forever, and the dispatcher never chooses that mode there. Inside
:func:`emulate_gpu` every launch runs each of its programs in a thread of its own, all at once,
so the programs of a batch tile meet at their grid-wide waits as they do on a GPU; and the
dispatcher plans launches as for a GPU of ``sms`` multiprocessors and compute capability
``capability`` (:func:`.common.persistent_geometry`): hidden units split over several programs,
each owning one chunk or looping over several, 16-unit chunks on sm_90, the decode step's split.

What it checks is the protocol between programs: which program writes which part of the shared
state, the arrival counts and targets of every wait, what is read after which wait, and the
reuse of buffers across steps. Python may switch threads between any two of a program's
operations (asking every :data:`SWITCH_INTERVAL_S` seconds, set for the duration; each tile
load, store or atomic is one operation, done whole), so a read that no wait orders after its
write can see the old value, in the interleavings that happen to run: a race is likely, not
certain, to show. It does not check the GPU's memory model (the threads see each other's stores
at once; the acquire and release semantics of the counters are the GPU check's), timing,
occupancy or anything the compiler does. The CUDA backend's counterpart is
:mod:`rnnkern.backends.cuda_emulation`.

It relies on two internals of ``triton.runtime.interpreter`` that Triton 3.6 to 3.9 share: the
``GridExecutor`` that runs a launch (its ``fn``, called once per program after
``interpreter_builder.set_grid_idx``) and the ``interpreter_builder`` whose ``grid_idx``
``tl.program_id`` reads; :func:`emulate_gpu` raises if they are missing.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import threading
import time
import types
from collections.abc import Iterator

from . import common

# How often Python switches threads while emulating (seconds; default 5 ms): a program polling
# a counter keeps the interpreter at most about this long before another thread may run.
SWITCH_INTERVAL_S = 1e-4

# per thread: grid_idx, the program a thread runs, and launch, the _ConcurrentLaunch it is in
_program = threading.local()


class _Aborted(BaseException):
    """Raised in a program's thread at its next memory access once its launch has failed (a
    BaseException: the interpreter wraps every Exception a nested jit function raises, which
    would hide this one)."""


def _concurrent_builder(base: type) -> type:
    """A subclass of the interpreter's builder class whose ``grid_idx`` is per thread and whose
    memory accesses stop a program once its launch has failed (a program left polling a
    counter would otherwise poll until the kernel's own spin limit)."""

    def stoppable(name: str):
        method = getattr(base, name)

        def access(self, *args, **kwargs):
            launch = getattr(_program, "launch", None)
            if launch is not None and launch.abort.is_set():
                raise _Aborted("the launch failed")
            return method(self, *args, **kwargs)

        return access

    namespace = {
        "grid_idx": property(
            lambda self: getattr(_program, "grid_idx", None),
            lambda self, value: setattr(_program, "grid_idx", value),
        )
    }
    for name in ("create_load", "create_masked_load", "create_atomic_rmw", "create_atomic_cas"):
        namespace[name] = stoppable(name)
    return type(f"Concurrent{base.__name__}", (base,), namespace)


class _ConcurrentLaunch:
    """Called by the interpreter once per program of a launch, in grid order: starts the
    program in a thread; the call for the last program waits for them all. Whatever ends the
    launch early (a program's error, the timeout, an interrupt of the calling thread) stops
    every program and waits for it before the launch returns or raises, so no thread outlives
    its launch."""

    def __init__(self, kernel, builder, timeout_s: float) -> None:
        self.kernel = kernel
        self.builder = builder
        self.timeout_s = timeout_s
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[tuple[int, int, int], BaseException]] = []
        self.abort = threading.Event()

    def _run(self, grid_idx: tuple[int, int, int], args: dict) -> None:
        _program.launch = self
        self.builder.grid_idx = grid_idx
        try:
            self.kernel(**args)
        except BaseException as err:  # reported by the launch, in the calling thread
            self.errors.append((grid_idx, err))
            self.abort.set()

    def stop(self) -> None:
        """Stop every program of the launch and wait for them (nothing after a complete
        launch, whose programs have all ended)."""
        self.abort.set()
        for thread in self.threads:
            thread.join()

    def __call__(self, **args) -> None:
        try:
            thread = threading.Thread(
                target=self._run, args=(self.builder.grid_idx, args), daemon=True
            )
            thread.start()
            self.threads.append(thread)  # (after start: stop() joins started threads only)
            if len(self.threads) < math.prod(self.builder.grid_dim):
                return
            deadline = time.monotonic() + self.timeout_s
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        except BaseException:  # (an interrupt of the calling thread)
            self.stop()
            raise
        stuck = sum(thread.is_alive() for thread in self.threads)
        if stuck:
            self.stop()
        failed = [(idx, err) for idx, err in self.errors if not isinstance(err, _Aborted)]
        if failed:
            idx, err = failed[0]
            raise RuntimeError(f"program {idx[:2]} of the launch failed: {err!r}") from err
        if stuck:
            raise RuntimeError(
                f"{stuck} of {len(self.threads)} programs were still running after "
                f"{self.timeout_s:g} s (a grid-wide wait that never completes?)"
            )


@contextlib.contextmanager
def emulate_gpu(
    sms: int = 4, capability: tuple[int, int] = (9, 0), timeout_s: float = 300.0
) -> Iterator[None]:
    """Within the block, Triton's interpreter runs every launch's programs concurrently and the
    backend plans launches for a GPU of ``sms`` multiprocessors and compute ``capability``
    (``(9, 0)``: an H100's rules, 16-unit chunks included). A launch whose programs are not all
    done after ``timeout_s`` seconds stops them and raises, as does one in which a program
    raised. Needs ``TRITON_INTERPRET=1`` (set before the backend was imported); not reentrant,
    and launches must come from one thread."""
    if not common.INTERPRET:
        raise RuntimeError(
            "emulate_gpu needs Triton's interpreter: set TRITON_INTERPRET=1 before importing "
            "rnnkern.backends.triton"
        )
    if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
        raise ValueError(f"sms must be an int >= 1, got {sms!r}")
    if common.EMULATED_GPU is not None:
        raise RuntimeError("emulate_gpu is already active (it is not reentrant)")
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    builder = getattr(interpreter, "interpreter_builder", None)
    if executor is None or builder is None or not hasattr(builder, "set_grid_idx"):
        import triton

        raise RuntimeError(
            f"emulate_gpu does not know this Triton's interpreter (triton {triton.__version__}: "
            "no GridExecutor / interpreter_builder.set_grid_idx)"
        )

    real_init, real_call = executor.__init__, executor.__call__

    def init(self, fn, *args, **kwargs) -> None:
        real_init(self, fn, *args, **kwargs)
        launch = _ConcurrentLaunch(fn, builder, timeout_s)
        self.rnnkern_launch = launch

        def programs(**kernel_args):
            launch(**kernel_args)

        # The interpreter reads the kernel's signature (inspect) and finds triton.language in
        # its globals (to patch it for the launch): the stand-in keeps both.
        stand_in = types.FunctionType(
            programs.__code__, fn.__globals__, fn.__name__, None, programs.__closure__
        )
        stand_in.__signature__ = inspect.signature(fn)
        self.fn = stand_in

    def call(self, *args, **kwargs):
        # (an interrupt between two programs' starts, in the interpreter's own loop, must not
        # leave the started ones running)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            self.rnnkern_launch.stop()

    builder_class = builder.__class__
    switch_interval = sys.getswitchinterval()
    builder.__class__ = _concurrent_builder(builder_class)
    executor.__init__, executor.__call__ = init, call
    common.EMULATED_GPU = (sms, tuple(capability))
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)
        common.EMULATED_GPU = None
        executor.__init__, executor.__call__ = real_init, real_call
        builder.__class__ = builder_class
