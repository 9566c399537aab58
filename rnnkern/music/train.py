"""Training a music language model: data, teacher forcing, checkpoints, exact resume, DDP.

One training step takes a batch of token windows ``x[B, T+1]``, feeds ``x[:, :-1]`` and scores
the model's prediction of ``x[:, 1:]`` (teacher forcing) with cross-entropy, padding ignored.

Determinism and resume: the order of windows in epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``, so it can be recomputed; checkpoints store the model,
the optimizer, torch's RNG state (dropout), the epoch and the step within it. Resuming from a
checkpoint continues exactly as the uninterrupted run would have.

Under ``torchrun --nproc_per_node=N`` the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPU); rank r takes batches r, r+N, ... of the same permutation, and
rank 0 alone writes checkpoints, the loss curve and the progress bar.
"""

from __future__ import annotations

import array
import gc
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import atomic_write, atomic_write_text
from ..backends import first_line
from .model import ModelConfig, MusicLM

CHECKPOINT_FORMAT = "rnnkern-music-1"
PAD = -100  # cross_entropy's ignore_index


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint)."""

    data: list[str] = field(default_factory=lambda: ["music21"])
    kind: str = "abc"  # abc | chars | performance
    epochs: int = 10
    batch_size: int = 32
    window: int = 256  # longest training window in tokens; longer sequences are cut
    optimizer: str = "adam"  # adam | rmsprop
    lr: float = 2e-3
    lr_decay: float = 0.97  # per epoch (folk-rnn decays its learning rate after each epoch)
    clip: float = 5.0
    val_fraction: float = 0.05
    seed: int = 0
    checkpoint_every: int = 200  # steps
    max_steps: int = 0  # stop after this many steps in total (0: no limit); for tests and time

    def __post_init__(self) -> None:
        if self.kind not in ("abc", "chars", "performance"):
            raise ValueError(f"kind must be abc, chars or performance, got {self.kind!r}")
        if self.optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"optimizer must be adam or rmsprop, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ValueError(
                f"max_steps must be an integer >= 0 (0: no limit), got {self.max_steps!r}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an integer >= 2, got {self.window!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        finite = all(math.isfinite(v) for v in (self.lr, self.clip, self.lr_decay))
        if not finite or not self.lr > 0 or not self.clip > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"lr and clip must be finite and > 0 and lr_decay in (0, 1], got lr={self.lr}, "
                f"clip={self.clip}, lr_decay={self.lr_decay}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Token-id sequences and their vocabulary (token strings, in id order)."""

    kind: str
    tokens: list[str]
    sequences: list[list[int]]
    report: str = ""


def load_dataset(kind: str, sources: Sequence[str], log: Callable[[str], None] = print) -> Dataset:
    """Read and tokenize a corpus; rejected tunes or files are counted in ``report``."""
    if kind == "abc":
        from . import abc

        corpus = abc.load_corpus(sources)
        if not corpus.tunes:
            raise ValueError(f"no tune of {list(sources)} could be tokenized:\n{corpus.report()}")
        return Dataset(
            kind,
            list(abc.VOCABULARY),
            [abc.encode(t.tokens) for t in corpus.tunes],
            corpus.report(),
        )
    if kind == "chars":
        from . import abc

        tunes = abc.load_tunes(sources)
        texts = [abc.tune_text_for_chars(t.text) for t in tunes]
        vocab = abc.CharVocabulary.from_texts(texts)
        return Dataset(
            kind,
            vocab.tokens,
            [vocab.encode(t) for t in texts],
            f"{len(texts)} tunes, {len(vocab.chars)} characters",
        )
    from . import performance

    tokenizer = performance.PerformanceTokenizer()
    sequences, report = performance.load_sequences(sources, tokenizer, log=log)
    return Dataset(kind, tokenizer.tokens, sequences, report)


def _check_has_data(dataset: Dataset, sources: Sequence[str]) -> None:
    # (the abc kind refuses an empty corpus itself, with its rejection report)
    if not dataset.sequences:
        what = {"chars": "ABC tune", "performance": "readable MIDI file"}.get(dataset.kind, "tune")
        raise ValueError(
            f"no training data: {list(sources)} holds no {what} for kind {dataset.kind!r}"
            + (f" ({dataset.report})" if dataset.report else "")
        )


def windows(sequences: Sequence[Sequence[int]], window: int) -> list[list[int]]:
    """Cut sequences into pieces of at most ``window + 1`` ids overlapping by one id, so that
    every next-token target of every sequence is scored exactly once."""
    out = []
    for seq in sequences:
        if len(seq) < 2:
            continue
        for start in range(0, len(seq) - 1, window):
            out.append(list(seq[start : start + window + 1]))
    return out


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and validation sequences (a seeded shuffle, then a cut)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return sorted(order[n_val:]), sorted(order[:n_val])


def batch_tensor(pieces: Sequence[Sequence[int]]) -> Tensor:
    """Pad pieces to one int64 tensor ``[B, T+1]`` with PAD."""
    width = max(len(p) for p in pieces)
    out = torch.full((len(pieces), width), PAD, dtype=torch.long)
    for i, p in enumerate(pieces):
        out[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of window indices) of one epoch, recomputable from (seed, epoch)."""
    # (mod 2**64, the generator's seed range: every seed the config takes has an order)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def loss_on(model: nn.Module, batch: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy of the next-token predictions of ``batch [B, T+1]``, and the count."""
    inputs = batch[:, :-1].clamp(min=0)  # pad positions feed token 0; their targets are ignored
    targets = batch[:, 1:]
    logits, _ = model(inputs)
    count = int((targets != PAD).sum())
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD
    )
    return loss, count


@torch.no_grad()
def evaluate(
    model: nn.Module, pieces: Sequence[Sequence[int]], batch_size: int, device="cpu"
) -> float:
    """Mean per-token cross-entropy (nats) over ``pieces``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pieces), batch_size):
        loss, n = loss_on(model, batch_tensor(pieces[i : i + batch_size]).to(device))
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint or exported model, checking that it is one."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"model file {path} is a directory, not a model file")
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    # torch.save writes a zip archive, and torch.load checks none of its CRCs: a file with a
    # flipped byte loaded, and generated noise. zipfile checks them (a few ms for the bundled
    # model).
    if not zipfile.is_zipfile(path):
        why = (
            "an empty file"
            if path.stat().st_size == 0
            else "not a torch.save archive, or a truncated one"
        )
        raise ValueError(f"{path} is not an rnnkern music model ({why})")
    try:
        with zipfile.ZipFile(path) as archive:
            # (a file saved after torch.serialization.set_crc32_options(False) stores 0 for
            # every CRC: nothing to check against)
            has_crcs = any(info.CRC for info in archive.infolist() if info.file_size)
            damaged = archive.testzip() if has_crcs else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        damaged = f"unreadable: {err}"
    if damaged is not None:
        raise ValueError(
            f"{path} is damaged (its record {damaged} fails the archive's check: a partial "
            "copy or a corrupted file); use another copy"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(
            f"{path} is not a readable rnnkern music model ({type(err).__name__}: "
            f"{first_line(err)[:200]})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rnnkern music model (format {CHECKPOINT_FORMAT})")
    missing = [key for key in _MODEL_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} is not a usable rnnkern music model: it lacks {missing}")
    return state


# What every model file holds (a checkpoint holds more: the optimizer, RNG states, position).
_MODEL_KEYS = ("kind", "tokens", "model_config", "train_config", "model", "history")
# and what a training checkpoint holds besides (export_model leaves these out)
_CHECKPOINT_KEYS = ("optimizer", "rng", "epoch", "step_in_epoch", "global_step")


def model_from_checkpoint(state: dict, backend: str = "auto") -> MusicLM:
    """The model of a loaded checkpoint or model file; ValueError when its weights do not fit
    its own configuration (a file edited or assembled by hand)."""
    try:
        model = MusicLM(ModelConfig.from_dict(state["model_config"]), backend=backend)
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"its weights do not fit its model configuration: {err}") from err
    model.eval()
    return model


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write only what generation needs (weights, configs, vocabulary, validation loss)."""
    state = load_checkpoint(checkpoint)
    slim = {k: state[k] for k in ("format", *_MODEL_KEYS)}
    slim["history"] = {"val_loss": state["history"]["val_loss"]}
    save_checkpoint(Path(out), slim)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr: epoch, step, loss, tokens/s."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr) -> None:
        self.total, self.enabled, self.stream = total, enabled, stream
        self.last = 0.0
        self.latest: tuple | None = None  # the last update's values

    def update(self, epoch: int, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.latest = (epoch, step, loss, tokens_per_s)
        now = time.monotonic()
        if now - self.last < 0.5 and step != self.total:
            return
        self.last = now
        self._draw(epoch, step, loss, tokens_per_s)

    def _draw(self, epoch: int, step: int, loss: float, tokens_per_s: float) -> None:
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\repoch {epoch} [{bar}] {step}/{self.total} loss {loss:.3f} {tokens_per_s:,.0f} tok/s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:  # (once: the line ends, later updates and closes write nothing)
            if self.latest is not None:  # the last step, which the throttle may have skipped
                self._draw(*self.latest)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False


def training_device(device: str = "auto") -> torch.device:
    """The device this process trains on.

    ``auto``: the process's own GPU (``cuda:LOCAL_RANK`` under torchrun) when there is one GPU
    per process, else the CPU. ``cpu`` or ``cuda`` force it; ``cuda`` without a GPU for this
    process is an error, not a silent CPU run.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cpu" or (device == "auto" and local_rank >= gpus):
        return torch.device("cpu")
    if local_rank >= gpus:
        raise ValueError(
            f"device cuda asked for, but this process (local rank {local_rank}) has no GPU of "
            f"its own ({gpus} visible)"
        )
    return torch.device("cuda", local_rank)


def _distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group), initialising the
    process group when run under torchrun: nccl for processes on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def _differences(saved: dict, given: dict, ignore: Sequence[str] = ()) -> list[str]:
    """``"key: saved X, given Y"`` for each key whose value differs."""
    return [
        f"{key}: saved {saved.get(key)!r}, given {given.get(key)!r}"
        for key in sorted(set(saved) | set(given))
        if key not in ignore and saved.get(key) != given.get(key)
    ]


def data_digest(sequences: Sequence[Sequence[int]]) -> str:
    """A SHA-256 of the token sequences, stored in checkpoints: a resumed run refuses data
    that changed since (its batches and validation split would silently differ)."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(len(seq).to_bytes(8, "little"))
        h.update(array.array("q", seq).tobytes())
    return h.hexdigest()


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files atomic_write leaves when a process is killed outright
    (SIGKILL) while writing one of the run's files (a checkpoint: tens of MB each)."""
    if out.is_dir():
        for name in ("checkpoint.pt", "model.pt", "loss.png", "history.json"):
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving its checkpoint."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: training stopped without saving the step (the
    checkpoint on disk, if any, is the last one written before)."""


def _on_any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """Whether ``flag`` is true on some rank: one all-reduce of it under DDP, where the ranks
    must agree (on the step to stop at: a rank that stopped alone would leave the others
    waiting in the next gradient all-reduce for good)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class _StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM during training: the first asks the loop to stop at the
    next step, after saving a checkpoint (a step is never cut in half: an optimizer step
    interrupted midway would leave half-updated weights); a second Ctrl-C stops at once.
    Under DDP the ranks agree on the step to stop at (one all-reduce of a flag per step)."""

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def received(self, device: torch.device, world: int) -> bool:
        return _on_any_rank(self.flag, device, world)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def train(
    config: TrainConfig,
    model_config: dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    dataset: Dataset | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    device: str = "auto",
) -> dict:
    """Train (or resume) a model in ``out_dir``; returns the final checkpoint state.

    ``out_dir/checkpoint.pt`` is written every ``checkpoint_every`` steps and at each epoch's
    end; ``out_dir/model.pt`` (weights only) and ``out_dir/loss.png`` at the end. With
    ``resume`` and an existing checkpoint, training continues from it (its configs win; a
    different ``config`` is an error, so that a resumed run is the run it claims to be).
    On the CPU a resumed run ends with the same weights as an uninterrupted one, bit for bit;
    on a GPU only with ``torch.use_deterministic_algorithms(True)``, since the embedding's
    backward accumulates with atomics there.
    """
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    dev = training_device(device)
    rank, world, owns_group = _distributed(dev)
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)

    if is_main:
        _remove_stale_temporaries(out)
    state = None
    if resume and ckpt_path.exists():
        try:
            state = load_checkpoint(ckpt_path)
        except ValueError as err:
            raise ValueError(f"cannot resume: {err}; or start afresh (--no-resume)") from err
        lacking = [k for k in _CHECKPOINT_KEYS if k not in state]
        if lacking:
            raise ValueError(
                f"cannot resume from {ckpt_path}: it is an exported model (weights only, as "
                f"model.pt), not a training checkpoint (it lacks {lacking}); start afresh "
                "(--no-resume)"
            )
    if state is not None:
        saved = TrainConfig.from_dict(state["train_config"])
        changed = _differences(asdict(saved), asdict(config), ignore=("epochs", "max_steps"))
        saved_model = {k: v for k, v in state["model_config"].items() if k != "vocab_size"}
        given_model = {k: v for k, v in model_config.items() if k != "vocab_size"}
        changed += _differences(saved_model, {**saved_model, **given_model})
        if changed:
            raise ValueError(
                f"{ckpt_path} was trained with a different configuration ("
                + "; ".join(changed)
                + "): resume with the saved settings (epochs and max_steps may differ), or "
                "start afresh (--no-resume, or another --out)"
            )
        model_config = state["model_config"]

    if dataset is None:
        dataset = load_dataset(config.kind, config.data, log=say)
    _check_has_data(dataset, config.data)
    say(dataset.report)
    digest = data_digest(dataset.sequences)
    if state is not None and state.get("data_digest", digest) != digest:
        raise ValueError(
            f"{ckpt_path} was trained on other data than {config.data} holds now (the files "
            "changed since): resuming would draw other batches and another validation split; "
            "restore the data, or start afresh (--no-resume, or another --out)"
        )
    mc = ModelConfig.from_dict({**model_config, "vocab_size": len(dataset.tokens)})
    train_idx, val_idx = split(len(dataset.sequences), config.val_fraction, config.seed)
    train_pieces = windows([dataset.sequences[i] for i in train_idx], config.window)
    val_pieces = windows([dataset.sequences[i] for i in val_idx], config.window)
    if not train_idx:
        raise ValueError(
            f"no training data: val_fraction {config.val_fraction} leaves none of the "
            f"{len(dataset.sequences)} sequences for training"
        )
    if not train_pieces:
        raise ValueError("no training data: every sequence is shorter than two tokens")

    torch.manual_seed(config.seed)  # weights init and dropout
    model = MusicLM(mc).to(dev)
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=config.lr)
    history: dict = {"step": [], "train_loss": [], "val_epoch": [], "val_loss": []}
    epoch, step_in_epoch, global_step = 0, 0, 0
    if state is not None:
        if state["tokens"] != dataset.tokens:
            raise ValueError(f"{ckpt_path} has a different vocabulary than the data")
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(
                f"{ckpt_path} does not fit its own model configuration: {err}"
            ) from err
        torch.set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if dev.type == "cuda" and "cuda_rng" in state:  # dropout on a GPU draws from its RNG
            cuda_rng = state["cuda_rng"]
            torch.cuda.set_rng_state(cuda_rng[rank] if rank < len(cuda_rng) else cuda_rng[0], dev)
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, history = state["global_step"], state["history"]
        # (epochs counted from 1, as the progress bar and the validation lines count them)
        say(f"resumed from {ckpt_path} at epoch {epoch + 1}, step {step_in_epoch}")

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    def gather(local: Tensor) -> list[Tensor]:
        if world == 1:
            return [local]
        import torch.distributed as dist

        out = [torch.empty(0)] * world
        dist.all_gather_object(out, local)
        return out

    def snapshot() -> dict:
        rng = gather(torch.get_rng_state())
        extra = {"cuda_rng": gather(torch.cuda.get_rng_state(dev))} if dev.type == "cuda" else {}
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": dataset.kind,
            "tokens": dataset.tokens,
            "model_config": mc.to_dict(),
            "train_config": asdict(config),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": rng,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "history": history,
            "data_digest": digest,
            **extra,
        }

    def diverged(step: int, what: str) -> TrainingDiverged:
        kept = f"{ckpt_path} holds" if ckpt_path.exists() else "no checkpoint holds"
        return TrainingDiverged(
            f"training diverged at step {step}: {what} (lr {config.lr}, clip "
            f"{config.clip}: a smaller learning rate may help); nothing was saved for it, and "
            f"{kept} the last finite weights"
        )

    def checkpoint() -> dict:
        # A step with a finite loss can still leave non-finite weights (an update too large):
        # never saved. (DDP keeps every rank's weights equal: all ranks raise here together.)
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
        if not bool(finite):  # (one host synchronisation, not one a parameter)
            raise diverged(global_step, "the weights are no longer finite")  # (its update)
        snap = snapshot()  # every rank takes part in the gather
        if is_main:
            save_checkpoint(ckpt_path, snap)
        return snap

    model.train()
    stopped = False
    stop_signal = _StopSignal()  # (before the line below: from it on, a signal is caught)
    say(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(train_pieces)} training and {len(val_pieces)} validation windows"
    )
    final = None
    try:
        while epoch < config.epochs and not stopped:
            for group in opt.param_groups:
                group["lr"] = config.lr * config.lr_decay**epoch
            batches = epoch_batches(len(train_pieces), config.batch_size, config.seed, epoch)
            mine = batches[rank::world]
            # every rank must take the same number of steps, or DDP's all-reduce would wait forever
            n_steps = len(batches) // world
            bar = Progress(n_steps, progress and is_main)
            t0, tokens_seen = time.monotonic(), 0
            while step_in_epoch < n_steps:
                # Checked before a step, so that running a finished run again takes no step.
                if config.max_steps and global_step >= config.max_steps:
                    stopped = True
                    bar.close()
                    say(f"stopped at step {global_step}: max_steps {config.max_steps}")
                    break
                if stop_signal.received(dev, world):  # Ctrl-C or SIGTERM: save, then stop
                    bar.close()
                    checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {global_step}: saved {ckpt_path}; run the same "
                        "command again to resume"
                    )
                batch = batch_tensor([train_pieces[i] for i in mine[step_in_epoch]]).to(dev)
                loss, count = loss_on(ddp_model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # Read after the backward is queued (the step's one host synchronisation) and
                # checked before the update: a non-finite loss never reaches the weights.
                loss_value = float(loss.detach())
                if _on_any_rank(not math.isfinite(loss_value), dev, world):
                    bar.close()
                    raise diverged(
                        global_step + 1,  # (the step being taken)
                        f"the loss is {loss_value}"
                        if not math.isfinite(loss_value)
                        else f"the loss is not finite on another rank (here {loss_value})",
                    )
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                opt.step()
                step_in_epoch += 1
                global_step += 1
                tokens_seen += count * world
                history["step"].append(global_step)
                history["train_loss"].append(loss_value)
                bar.update(
                    epoch + 1,
                    step_in_epoch,
                    loss_value,
                    tokens_seen / (time.monotonic() - t0),
                )
                if global_step % config.checkpoint_every == 0:
                    checkpoint()
            bar.close()
            if not stopped:
                if val_pieces:
                    val = evaluate(model, val_pieces, config.batch_size, dev)
                    history["val_epoch"].append(epoch + 1)
                    history["val_loss"].append(val)
                    say(f"epoch {epoch + 1}: validation loss {val:.4f} nats/token")
                else:
                    say(
                        f"epoch {epoch + 1} done (no validation set: val_fraction "
                        f"{config.val_fraction} holds out no window)"
                    )
                epoch, step_in_epoch = epoch + 1, 0
            final = checkpoint()

        if final is None:  # (no epoch left to run: a finished run, run again)
            final = checkpoint()
        if is_main:
            export_model(ckpt_path, out / "model.pt")
            plot_losses(history, out / "loss.png")
            atomic_write_text(out / "history.json", json.dumps(history))
    finally:
        stop_signal.restore()
    if owns_group:
        # A process that exits with its gloo group alive can abort in the group's threads
        # during interpreter shutdown ("terminate called without an active exception"): the
        # two-process test failed 2 runs of 8 on a loaded 2-core machine, 0 of 8 with this
        # barrier and destroy (destroying without the barrier, while rank 0 still wrote its
        # files, failed 2 of 3). Only on success: after an exception on one rank, the others
        # may still be inside a collective and destroying would hang.
        import torch.distributed as dist

        # The DDP wrapper (its reducer holds the group) goes first: freed after the destroy,
        # when this function returned, it hung a rank for good in 1-2 runs of 10 with two
        # busy processes beside them (faulthandler: stuck in C at the call of train()); with
        # it freed here, 0 of 30.
        del ddp_model
        gc.collect()
        dist.barrier()  # rank 0 has written its files; no rank leaves a peer mid-exchange
        dist.destroy_process_group()
    return final


def plot_losses(history: dict, path: Path) -> None:
    """Training loss per step (smoothed) and validation loss per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = history["step"], history["train_loss"]
    if losses:
        k = max(1, len(losses) // 100)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
        ax.plot(steps, smooth, label="training (running mean)")
    if history["val_loss"] and steps:
        per_epoch = len(steps) / max(len(history["val_loss"]), 1)
        ax.plot(
            [e * per_epoch for e in history["val_epoch"]],
            history["val_loss"],
            "o-",
            label="validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
