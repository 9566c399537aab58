"""The ``rnnkern`` command: bench, backends, and the music layer's train and generate."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from .atomic import writable_folder_problem


def int_at_least(
    text: str, minimum: int, maximum: int | None = None, maximum_text: str | None = None
) -> int:
    """``text`` as an integer in ``[minimum, maximum)``, else argparse's error saying so (a
    ValueError would name the type function: "invalid positive_int value")."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum_text or maximum})"
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value >= maximum):
        raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return int_at_least(text, 0)


def device_name(text: str) -> str:
    """An argparse type: a torch device string of type cpu or cuda ("cuda:1" included)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _bench(args: argparse.Namespace) -> int:
    if args.allocator == "no-trim" and os.environ.get(_ALLOCATOR_ENV) != "no-trim":
        return _reexec_without_trimming(args.argv)  # before anything allocates much
    import torch

    from .bench import runner

    if not args.no_write:
        problem = writable_folder_problem(args.out)
        if problem:
            print(f"rnnkern bench: --out {args.out}: {problem}", file=sys.stderr)
            return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"rnnkern bench: --device {args.device} asked for, but torch sees no CUDA device",
            file=sys.stderr,
        )
        return 2
    suites = args.suite or ["nn_modules"]
    known = runner.suite_names()
    unknown = [s for s in suites if s not in known]
    if unknown:
        print(f"rnnkern bench: unknown suite(s) {unknown}; choose from {known}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(record: dict) -> None:
        base = record["results"][record["baseline"]]["median_s"]
        parts = [
            f"{label} {row['median_s'] * 1e3:.3f} ms ({row['ratio_vs_baseline']:.2f}x)"
            for label, row in record["results"].items()
        ]
        print(
            f"[{record['suite']}] {record['name']}: baseline {base * 1e3:.3f} ms; "
            + "; ".join(parts),
            flush=True,
        )

    records = runner.run_suites(
        suites,
        device=args.device,
        quick=args.quick,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=progress,
    )
    empty = [s for s in suites if not any(r["suite"] == s for r in records)]
    if empty:
        print(
            f"rnnkern bench: suite(s) {empty} have no case on device {args.device} (the GPU "
            "suites need --device cuda)",
            file=sys.stderr,
        )
        if len(empty) == len(suites):
            return 2  # (nothing measured: no empty results files)
    print()
    print(runner.format_table(records))
    if not args.no_write:
        command = "rnnkern " + " ".join(shlex.quote(a) for a in args.argv)
        tag = "+".join(suites) + ("-quick" if args.quick else "")
        tag += "-notrim" if args.allocator == "no-trim" else ""
        paths = runner.write_results(records, args.out, tag, device=args.device, command=command)
        print("\nwrote " + " and ".join(str(p) for p in paths))
    return 0


# glibc returns freed memory to the system (heap trimming, mmap for large blocks), so a
# baseline that allocates large buffers every call (oneDNN's LSTM re-orders its weights on every
# call) pays page faults, and how many depends on what the process allocated before: stepping
# nn.LSTM 3x512 took 1.6 ms per token in a fresh process and 6-7 ms after importing any large
# extension (rnnkern._cpu, triton). "--allocator no-trim" re-runs the benchmark with glibc told
# to keep freed memory, which gives such baselines their best case.
_ALLOCATOR_ENV = "RNNKERN_BENCH_ALLOCATOR"
_NO_TRIM = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest: blocks up to 32 MiB on the heap
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),  # never give the heap's top back
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def _reexec_without_trimming(argv: list[str]) -> int:
    import platform

    if platform.libc_ver()[0] != "glibc":
        print("rnnkern bench: --allocator no-trim needs glibc", file=sys.stderr)
        return 2
    env = {**os.environ, **_NO_TRIM, _ALLOCATOR_ENV: "no-trim"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "rnnkern.cli", *argv], env)
    return 0  # not reached


def _backends(args: argparse.Namespace) -> int:
    from . import backends

    for name in backends.KERNEL_BACKENDS:
        reason = backends.unavailable_reason(name)
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"{'torch':10s} available (torch.nn's own fused implementation)")
    names = backends.available_backends(args.device)
    what = ", ".join(names) if names else "none (torch sees no CUDA device)"
    print(f"for device {args.device}: {what}")
    return 0


def _music_missing(error: ImportError):
    def handler(args: argparse.Namespace) -> int:
        print(
            f"rnnkern {args.command}: the music layer needs its extra packages "
            f"(pip install 'rnnkern[music]'): {error}",
            file=sys.stderr,
        )
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnkern", description="Fused RNN kernels for PyTorch: benchmarks and music."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time rnnkern beside torch.nn on a list of shapes")
    bench.add_argument(
        "--suite", action="append", help="suite to run (repeatable); default nn_modules"
    )
    bench.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    bench.add_argument("--repeats", type=positive_int, default=15, help="timed rounds (default 15)")
    bench.add_argument(
        "--warmup", type=nonnegative_int, default=3, help="warm-up rounds (default 3)"
    )
    bench.add_argument("--threads", type=nonnegative_int, default=0,
                       help="torch threads (default: torch's)")  # fmt: skip
    bench.add_argument("--out", default="benchmarks/results", help="results folder")
    bench.add_argument("--no-write", action="store_true", help="print only, write no files")
    bench.add_argument(
        "--allocator",
        choices=("default", "no-trim"),
        default="default",
        help="no-trim: run with glibc keeping freed memory (the best case for baselines that "
        "allocate every call; results get a -notrim suffix)",
    )
    bench.set_defaults(func=_bench)

    backends = sub.add_parser("backends", help="list backends and why any is unavailable")
    backends.add_argument("--device", type=device_name, default="cpu")
    backends.set_defaults(func=_backends)

    try:
        from .music import cli as music_cli
    except ImportError as err:
        for name in ("train", "generate"):
            p = sub.add_parser(name, help=f"music: {name} (needs rnnkern[music])")
            p.set_defaults(func=_music_missing(err))
    else:
        music_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``rnnkern`` command (``argv`` None: ``sys.argv``, as the command runs); returns the
    exit status. In process (``argv`` given) a Ctrl-C returns 130; as the command, the process
    ends by SIGINT, as Python's own handling does, so that a shell loop around it stops too."""
    as_command = argv is None
    try:  # (building the parser imports torch: a Ctrl-C may come that early)
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv
        status = int(args.func(args) or 0)
        # Output still buffered (stdout to a pipe is block-buffered) goes now, inside this
        # try: at interpreter exit a closed pipe would print "Exception ignored ...".
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:  # (training saves its checkpoint and says so itself)
        print("\nrnnkern: interrupted", file=sys.stderr)
        if as_command:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BrokenPipeError:
        # The reader of stdout stopped (``rnnkern generate | head``): nothing more to say,
        # and Python's flush at exit must not fail on the closed pipe again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # (stdout not a file: nothing to flush)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends
        return 141  # (a shell's code for a process ended by SIGPIPE)


if __name__ == "__main__":
    sys.exit(main())
