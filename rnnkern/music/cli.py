"""``rnnkern train`` and ``rnnkern generate``: the music layer's command line.

``register(subparsers)`` adds both subcommands to the ``rnnkern`` parser. Heavy imports
(music21, pretty_midi, matplotlib) happen inside the handlers, so ``rnnkern --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..atomic import writable_folder_problem
from ..cli import int_at_least, nonnegative_int, positive_int

DEFAULT_MODEL = Path(__file__).parent / "models" / "folk_lstm.pt"


def seed(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**64)."""
    return int_at_least(text, 0, 2**64, "2**64")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``generate`` subcommands to an argparse subparsers object."""
    t = subparsers.add_parser(
        "train",
        help="train a music language model (ABC tunes, characters or MIDI performances)",
        description="Train a music language model; runs under torchrun as DDP.",
    )
    t.add_argument("--data", action="append", default=None,
                   help="music21 collection (oneills1850, ryansMammoth, airdsAirs, "
                   "essenFolksong; 'music21' for all four; 'bach' or 'bach:N' for all or "
                   "the first N chorales as MIDI, with --kind performance) "
                   "or a folder of .abc/.mid files; repeatable (default: music21)")  # fmt: skip
    t.add_argument("--kind", choices=("abc", "chars", "performance"), default="abc",
                   help="abc: folk-rnn v2 tokens; chars: folk-rnn v1 characters; "
                   "performance: MIDI events (default abc)")  # fmt: skip
    t.add_argument("--out", required=True, help="run folder (checkpoint.pt, model.pt, loss.png)")
    t.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    t.add_argument("--hidden", type=positive_int, default=256, help="hidden size (256)")
    t.add_argument("--layers", type=positive_int, default=2, help="layers (2)")
    t.add_argument("--embedding", type=int, default=64, help="embedding size; 0: one-hot (64)")
    t.add_argument("--dropout", type=float, default=0.3)
    t.add_argument("--epochs", type=positive_int, default=10)
    t.add_argument("--batch-size", type=positive_int, default=32)
    t.add_argument("--window", type=positive_int, default=256, help="tokens per window (256)")
    t.add_argument("--optimizer", choices=("adam", "rmsprop"), default="adam")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--lr-decay", type=float, default=0.97, help="per epoch (0.97)")
    t.add_argument("--clip", type=float, default=5.0, help="gradient norm clip (5)")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--seed", type=seed, default=0)
    t.add_argument("--checkpoint-every", type=positive_int, default=200, help="steps (200)")
    t.add_argument("--max-steps", type=nonnegative_int, default=0,
                   help="stop after N steps in total (0: none)")  # fmt: skip
    t.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch threads (0: torch's default)")  # fmt: skip
    t.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: this process's GPU when each process has one (nccl under torchrun), else "
        "the CPU (gloo)",
    )
    t.add_argument("--no-resume", action="store_true",
                   help="start afresh even if OUT/checkpoint.pt exists (otherwise training "
                   "resumes from it, with the settings it was trained with; other settings "
                   "are an error, except --epochs and --max-steps). Ctrl-C or SIGTERM "
                   "saves a checkpoint at the next step and stops")  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    g = subparsers.add_parser(
        "generate",
        help="generate folk tunes (ABC) or performances (MIDI) from a trained model",
        description="Generate tunes. With no --model, the bundled folk model is used.",
    )
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="model file (default: bundled)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=seed, default=42)
    g.add_argument("--meter", default=None, help="e.g. 6/8 or M:6/8 (default: the model picks)")
    g.add_argument("--mode", default=None,
                   help="maj, min, dor, mix or K:Cmaj ... (default: the model picks)")  # fmt: skip
    g.add_argument("--prime", default=None,
                   help="start of the tune body, ABC in C (e.g. 'c2 G E|') or tokens; "
                   "ornaments, chord symbols, slurs and ties are left out, as in the "
                   "training data")  # fmt: skip
    g.add_argument("--count", type=positive_int, default=1, help="number of tunes (1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    g.add_argument("--max-tokens", type=positive_int, default=1000,
                   help="stop a tune after this many tokens, its header's included "
                   "(1000)")  # fmt: skip
    from rnnkern.decode import BACKENDS as DECODER_BACKENDS

    g.add_argument("--decoder", choices=("auto", *DECODER_BACKENDS),
                   default="auto",
                   help="decoder backend: auto (C++ if built, else torch), cpu, torch, or "
                   "triton / cuda on a CUDA device (the same tunes up to float rounding)",
                   )  # fmt: skip
    g.add_argument("--midi", default=None,
                   help="also write the tunes to this MIDI file (a performance model writes "
                   "only MIDI, and needs it)")  # fmt: skip
    g.add_argument("--tempo", type=float, default=None,
                   help="MIDI tempo of folk tunes in quarter notes per minute (120)")  # fmt: skip
    g.set_defaults(func=_generate)


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..backends import BackendUnavailableError
    from .train import TrainConfig, TrainingDiverged, TrainingInterrupted, train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = TrainConfig(
            data=args.data or (["bach"] if args.kind == "performance" else ["music21"]),
            kind=args.kind,
            epochs=args.epochs,
            batch_size=args.batch_size,
            window=args.window,
            optimizer=args.optimizer,
            lr=args.lr,
            lr_decay=args.lr_decay,
            clip=args.clip,
            val_fraction=args.val_fraction,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            max_steps=args.max_steps,
        )
        model_config = {
            "embedding_dim": args.embedding,
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "cell": args.cell,
            "dropout": args.dropout,
        }
        # The run folder, made before the data loads and steps run (a folder that cannot be made
        # was found at the first checkpoint, 200 steps in)
        problem = writable_folder_problem(args.out)
        if problem is None:
            try:
                Path(args.out).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                problem = f"cannot make the folder ({err.strerror or err})"
        if problem:
            print(f"rnnkern train: --out {args.out}: {problem}", file=sys.stderr)
            return 2
        train(
            config,
            model_config,
            args.out,
            resume=not args.no_resume,
            progress=not args.quiet,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, TrainingDiverged, BackendUnavailableError) as err:
        print(f"rnnkern train: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(f"\nrnnkern train: {err}", file=sys.stderr)
        return 130  # (the shell's code for a run stopped by Ctrl-C)
    except RuntimeError as err:
        from ..backends import first_line, out_of_memory

        if not out_of_memory(err):
            raise
        print(
            f"rnnkern train: out of memory ({first_line(err)}): a smaller --hidden, --layers, "
            "--batch-size or --window fits",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 wrote the files
        print(f"wrote {Path(args.out) / 'model.pt'} and {Path(args.out) / 'loss.png'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ..backends import BackendUnavailableError
    from .generate import GenerateError, run_generate

    try:
        return run_generate(args)
    except (
        GenerateError, ValueError, FileNotFoundError, FloatingPointError, BackendUnavailableError
    ) as err:  # fmt: skip
        print(f"rnnkern generate: {err}", file=sys.stderr)
        return 2
