"""Generation from a trained music model with the project's one sampling rule.

Stream ``b`` of a batch of ``count`` tunes draws its token at position ``t`` from
``rnnkern.sampling.sample(..., seed, step=t)`` row ``b``, so the same model, seed and
arguments give the same tunes on every run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rnnkern import Decoder, available_backends
from rnnkern.decode import BACKENDS as DECODER_BACKENDS
from rnnkern.sampling import check_sampling_args, sample

from ..atomic import atomic_write, writable_folder_problem
from ..backends import first_line, out_of_memory
from . import abc
from .model import MusicLM
from .train import load_checkpoint, model_from_checkpoint


class GenerateError(ValueError):
    """Bad generation arguments (a prime outside the vocabulary, an unknown meter, ...)."""


def normalise_meter(meter: str) -> str:
    """``6/8`` or ``M:6/8`` -> ``M:6/8``; other meters raise naming the allowed ones."""
    token = meter.strip().replace(" ", "")
    token = token if token.startswith("M:") else f"M:{token}"
    if token not in abc.METER_TOKENS:
        allowed = ", ".join(t[2:] for t in abc.METER_TOKENS)
        raise GenerateError(f"--meter must be one of {allowed}; got {meter!r}")
    return token


def normalise_mode(mode: str) -> str:
    """``dor``, ``Cdor``, ``K:Cdor``, ``minor`` ... -> ``K:Cdor``."""
    text = mode.strip()
    text = text[2:] if text.startswith("K:") else text
    text = text[1:] if text[:1] == "C" else text
    word = text.lower()[:3] if text.lower() != "m" else "m"
    if word not in abc.MODE_NAMES:
        raise GenerateError(f"--mode must be one of maj, min, dor, mix; got {mode!r}")
    return abc.MODE_NAMES[word]


def prime_tokens(prime: str, meter: str | None, mode: str | None) -> list[str]:
    """Tokens of a prime given as folk-rnn tokens (``c 2 G E |``) or as ABC text in C.

    Anything outside the vocabulary raises :class:`GenerateError` naming every such symbol.
    """
    pieces = prime.split()
    if pieces and all(p in abc.TOKEN_TO_ID for p in pieces):
        return [p for p in pieces if p not in abc.SPECIAL_TOKENS]
    header = f"X:1\nT:--prime\n{meter or 'M:4/4'}\nL:1/8\nK:{(mode or 'K:Cmaj')[2:]}\n"
    try:
        tune = abc.parse_tune(header + prime, first_line=0)
        # The prime is already in C: spell it as written, without transposing.
        return abc._spell_body(tune, 0, 0)
    except abc.AbcError as err:
        unknown = [p for p in pieces if p not in abc.TOKEN_TO_ID]
        raise GenerateError(
            f"--prime is neither vocabulary tokens (not in the vocabulary: {unknown}) nor ABC "
            f"the tokenizer can represent: {err}"
        ) from err


DECODERS = ("auto", *DECODER_BACKENDS)  # auto: the C++ decoder if built, else torch


def music_decoder(model: MusicLM, count: int, decoder: str = "auto") -> Decoder:
    """A :class:`rnnkern.Decoder` over ``model``'s weights for ``count`` streams.

    A one-hot model (no embedding) gets an identity embedding, which the decoder folds into
    layer 0's input weights. ``decoder`` picks the Decoder backend: ``"auto"`` takes the C++
    decoder when the extension is built, else the decoder's torch backend (the same steps and
    the same tokens, only slower, and the command says so); ``"cpu"`` / ``"torch"`` run on the
    CPU; ``"triton"`` / ``"cuda"`` run a copy of the model on the CUDA device. A backend that
    cannot run here is a GenerateError saying why. Every backend draws by the same rule and
    generator, so the tunes are the same up to float rounding of near-ties.
    """
    if decoder not in DECODERS:
        raise GenerateError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    embedding = model.embedding
    if embedding is None:
        V = model.config.vocab_size
        embedding = torch.nn.Embedding.from_pretrained(torch.eye(V, dtype=model.head.weight.dtype))
    rnn, head = model.rnn, model.head
    if decoder == "auto":
        decoder = "cpu" if "cpu" in available_backends("cpu") else "torch"
        if decoder == "torch":
            print(
                "rnnkern: the C++ extension is not built (`rnnkern backends` says why); "
                "decoding with torch ops instead (same tunes, slower)",
                file=sys.stderr,
            )
    elif decoder in ("triton", "cuda"):
        if not torch.cuda.is_available():
            raise GenerateError(
                f"--decoder {decoder} runs on a CUDA device, and none is visible "
                "(torch.cuda.is_available() is False); use --decoder cpu"
            )
    try:
        if decoder in ("triton", "cuda"):
            rnn, embedding, head = (copy.deepcopy(m).cuda() for m in (rnn, embedding, head))
        return Decoder(rnn, embedding, head, batch_size=count, backend=decoder)
    except RuntimeError as err:  # a backend that is not built: the reason, as a clear error
        if out_of_memory(err):
            raise GenerateError(
                f"--count {count}: the decoder's state for {count} streams does not fit in "
                f"memory ({first_line(err)})"
            ) from err
        raise GenerateError(f"--decoder {decoder}: {err}") from err


@torch.no_grad()
def sample_sequences_stepwise(
    model: MusicLM,
    prefix: Sequence[int],
    count: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    steps: int = 50,
) -> list[list[int]]:
    """``steps`` tokens after ``prefix`` by stepping the nn.Module itself, one Python iteration
    per token: the slow, obvious definition that :func:`sample_sequences` is tested against."""
    model.eval()
    seqs = [list(prefix) for _ in range(count)]
    logits, state = model(torch.tensor(seqs, dtype=torch.long))
    for position in range(len(prefix), len(prefix) + steps):
        token = sample(logits[:, -1, :].float(), temperature, top_k, top_p, seed, position)
        for b in range(count):
            seqs[b].append(int(token[b]))
        logits, state = model(token.view(count, 1), state)
    return seqs


@torch.no_grad()
def sample_sequences(
    model: MusicLM,
    prefix: Sequence[int],
    count: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    max_tokens: int = 1000,
    end_id: int | None = 1,
    forced: dict[int, int] | None = None,
    chunk: int = 128,
    decoder: str = "auto",
) -> list[list[int]]:
    """Sample ``count`` sequences that start with ``prefix`` (ids, including <s>).

    The token at position ``t`` of sequence ``b`` is drawn by the project's sampling rule with
    ``uniform(seed, b, t)``. ``forced`` maps a position to the id it must hold (e.g. a chosen
    mode after a sampled meter). A sequence ends after ``end_id`` or at ``max_tokens`` ids in
    total. Generation runs in :class:`rnnkern.Decoder` calls of up to ``chunk`` tokens (the
    whole loop in C++ within a call), stopping after the call in which every sequence ended.
    ``decoder`` picks the Decoder backend (:func:`music_decoder`).
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prefix:
        raise GenerateError("the prefix must hold at least the start token")
    if not isinstance(count, int) or count < 1:
        raise GenerateError(f"count must be an int >= 1, got {count!r}")
    forced = dict(forced or {})
    model.eval()
    dec = music_decoder(model, count, decoder)
    seqs = [list(prefix) for _ in range(count)]
    done = [False] * count
    # Tokens the sequences hold that the decoder has not consumed yet (generate consumes all
    # of its prime and every token it samples but the last).
    pending = torch.tensor([list(prefix)] * count, dtype=torch.long)
    position = len(prefix)
    while position < max_tokens and not all(done):
        if position in forced:
            token = torch.full(
                (count, 1), forced[position], dtype=torch.long, device=pending.device
            )
            for b in range(count):
                if not done[b]:
                    seqs[b].append(forced[position])
                    done[b] = end_id is not None and forced[position] == end_id
            pending = torch.cat([pending, token], dim=1)
            position += 1
            continue
        stop = min([max_tokens, position + chunk] + [p for p in forced if p > position])
        out = dec.generate(
            pending, stop - position, temperature, top_k, top_p, seed, first_step=position
        )
        rows = out.tolist()  # one copy from the decoder's device
        for b in range(count):
            for token in rows[b]:
                if done[b]:
                    break
                seqs[b].append(token)
                done[b] = end_id is not None and token == end_id
        pending = out[:, -1:]
        position = stop
    return seqs


def abc_tunes_to_midi(token_lists: Sequence[Sequence[str]], tempo: float, program: int = 40):
    """Tunes one after another (a bar's rest between them) as a pretty_midi.PrettyMIDI, each
    with its time signature (the tune's meter) where it starts.

    ``tempo`` is in quarter notes per minute; program 40 is General MIDI's violin.
    """
    import pretty_midi

    check_tempo(tempo)
    seconds_per_eighth = 60.0 / tempo / 2
    pm = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    inst = pretty_midi.Instrument(program=program, name="folk")
    offset = 0.0
    for tokens in token_lists:
        sounding, _ = abc.interpret(tokens)
        meter = abc.body_tokens(tokens)[0] or "M:4/4"
        numerator, denominator = abc.meter_signature(meter)
        pm.time_signature_changes.append(pretty_midi.TimeSignature(numerator, denominator, offset))
        end = 0.0
        for s in sounding:
            start = offset + float(s.start) * seconds_per_eighth
            stop = start + float(s.length) * seconds_per_eighth
            for p in s.pitches:
                inst.notes.append(pretty_midi.Note(velocity=80, pitch=p, start=start, end=stop))
            end = max(end, stop)
        offset = max(end, offset) + float(abc.meter_bar_length(meter)) * seconds_per_eighth
    pm.instruments.append(inst)
    return pm


# MIDI's set-tempo event holds microseconds per quarter note in 24 bits, so the slowest tempo
# it can say is 60e6 / (2**24 - 1) = 3.58 quarter notes per minute, and the fastest 60e6 (1 us).
MIN_TEMPO, MAX_TEMPO = 60e6 / 0xFFFFFF, 60e6
DEFAULT_TEMPO = 120.0


def check_midi_path(path: str | Path) -> None:
    """Refuse, before any work, a --midi path that names a directory or lies where no file
    can be written."""
    if Path(path).is_dir():
        raise GenerateError(f"--midi must name a file, got the directory {path}")
    problem = writable_folder_problem(str(Path(path).absolute().parent))
    if problem:
        raise GenerateError(f"cannot write --midi {path}: {problem}")


def check_tempo(tempo: float) -> None:
    if not MIN_TEMPO <= tempo <= MAX_TEMPO:
        raise GenerateError(
            f"--tempo must be in [{MIN_TEMPO:.2f}, {MAX_TEMPO:g}] quarter notes per minute (what "
            f"a MIDI file can hold), got {tempo:g}"
        )


def write_midi(pm, path: str | Path) -> None:
    """Write a PrettyMIDI atomically; an OSError (a folder not writable, a full disk) is a
    GenerateError naming ``path``."""
    check_midi_path(path)
    try:
        atomic_write(Path(path), lambda tmp: pm.write(tmp))
    except OSError as err:
        raise GenerateError(f"cannot write --midi {path}: {err.strerror or err}") from err


_FLAGS = ("--temperature", "--top-k", "--top-p")  # (check_sampling_args' names)


def run_generate(args: argparse.Namespace, out=None) -> int:
    """The ``rnnkern generate`` command: print ABC tunes, or write MIDI for performance models."""
    out = out if out is not None else sys.stdout  # looked up per call, so it can be redirected
    check_sampling_args(args.temperature, args.top_k, args.top_p, _FLAGS)
    if args.midi:
        check_midi_path(args.midi)
    state = load_checkpoint(args.model)
    try:
        model = model_from_checkpoint(state)
    except ValueError as err:
        raise GenerateError(f"{args.model} is not a usable model: {err}") from err
    kind, tokens = state["kind"], state["tokens"]
    tempo = getattr(args, "tempo", None)
    if kind == "performance":
        if tempo is not None:
            raise GenerateError("--tempo applies to folk (ABC) models: a performance has its own")
        return _generate_performance(args, model, tokens, out)
    args.tempo = DEFAULT_TEMPO if tempo is None else tempo
    check_tempo(args.tempo)
    if kind == "chars":
        return _generate_chars(args, model, tokens, out)
    if tokens != list(abc.VOCABULARY):
        raise GenerateError(f"{args.model} has an ABC vocabulary that is not folk-rnn v2's")
    meter = normalise_meter(args.meter) if args.meter else None
    mode = normalise_mode(args.mode) if args.mode else None
    prefix = ["<s>"]
    forced: dict[int, int] = {}
    if meter:
        prefix.append(meter)
    if mode:
        if meter:
            prefix.append(mode)
        else:
            forced[2] = abc.TOKEN_TO_ID[mode]  # the model picks the meter, then this mode
    primed = prime_tokens(args.prime, meter, mode) if args.prime else []
    if primed and not (meter and mode):
        raise GenerateError("--prime needs --meter and --mode, which come before it in a tune")
    prefix += primed
    seqs = sample_sequences(
        model,
        abc.encode(prefix),
        args.count,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        decoder=getattr(args, "decoder", "auto"),
        seed=args.seed,
        max_tokens=args.max_tokens,
        end_id=abc.TOKEN_TO_ID["</s>"],
        forced=forced,
    )
    token_lists = [abc.decode(s) for s in seqs]
    # The file first: a reader of the text that stops early (``| head``) must not cost it.
    if args.midi:
        write_midi(abc_tunes_to_midi(token_lists, args.tempo), args.midi)
        print(
            f"wrote {args.midi}: {len(token_lists)} tune(s) at {args.tempo:g} quarter notes "
            "per minute",
            file=sys.stderr,
        )
    source = "rnnkern folk model" if _is_bundled(args.model) else Path(args.model).name
    for i, toks in enumerate(token_lists):
        title = f"{source}, seed {args.seed}, tune {i + 1}"
        if toks[-1] != "</s>":
            title += f" (stopped at {args.max_tokens} tokens)"
        out.write(abc.detokenize(toks, number=i + 1, title=title) + "\n")
    return 0


def _is_bundled(model: str) -> bool:
    from .cli import DEFAULT_MODEL

    return Path(model).resolve() == DEFAULT_MODEL.resolve()


def _generate_chars(args: argparse.Namespace, model: MusicLM, tokens: list[str], out) -> int:
    if args.meter or args.mode:
        raise GenerateError("--meter and --mode need a folk-rnn v2 (token) model, not characters")
    vocab = abc.CharVocabulary(tokens[len(abc.SPECIAL_TOKENS) :])
    prefix = [0] + (vocab.encode(args.prime)[1:-1] if args.prime else [])
    seqs = sample_sequences(
        model,
        prefix,
        args.count,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        decoder=getattr(args, "decoder", "auto"),
        seed=args.seed,
        max_tokens=args.max_tokens,
        end_id=1,
    )
    texts = [f"X:{i + 1}\n{vocab.decode(s)}\n" for i, s in enumerate(seqs)]
    if args.midi:  # (the file first, as for token models)
        readable, failed = [], []
        for i, text in enumerate(texts):
            try:
                readable.append(abc.tokenize(text))
            except abc.AbcError as err:
                failed.append(f"tune {i + 1}: {err}")
        if failed:
            print("not written to MIDI:\n  " + "\n  ".join(failed), file=sys.stderr)
        if readable:
            write_midi(abc_tunes_to_midi(readable, args.tempo), args.midi)
            print(f"wrote {args.midi}: {len(readable)} of {len(texts)} tune(s)", file=sys.stderr)
    for text in texts:
        out.write(text + "\n")
    if args.midi and not readable:
        raise GenerateError(f"none of the tunes could be read as ABC: {args.midi} not written")
    return 0


def _generate_performance(args: argparse.Namespace, model: MusicLM, tokens: list[str], out) -> int:
    from .performance import PerformanceTokenizer

    if args.meter or args.mode:
        raise GenerateError("--meter and --mode apply to folk (ABC) models, not performances")
    if not args.midi:  # (it wrote ./performance.mid, over any file of that name, before)
        raise GenerateError("a performance model writes MIDI: name the file with --midi PATH")
    tokenizer = PerformanceTokenizer.from_tokens(tokens)
    prefix = [tokenizer.start_id]
    if args.prime:
        prefix += tokenizer.ids_from_names(args.prime.split())
    seqs = sample_sequences(
        model,
        prefix,
        args.count,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        decoder=getattr(args, "decoder", "auto"),
        seed=args.seed,
        max_tokens=args.max_tokens,
        end_id=tokenizer.end_id,
    )
    path = args.midi
    pm = tokenizer.decode_many([s for s in seqs], gap=2.0)
    write_midi(pm, path)
    notes = sum(len(i.notes) for i in pm.instruments)
    out.write(f"wrote {path}: {len(seqs)} performance(s), {notes} notes\n")
    return 0
