"""Performance RNN's event vocabulary (Simon & Oore, 2017) for MIDI performances.

Events in Magenta's order, each a Type_Value name:

    NOTE_ON_0 .. NOTE_ON_127        ids   0..127
    NOTE_OFF_0 .. NOTE_OFF_127      ids 128..255
    TIME_SHIFT_1 .. TIME_SHIFT_n    ids 256..     (n steps of the time step; n = 100 x 10 ms)
    VELOCITY_1 .. VELOCITY_32       the last 32   (velocity bins of width 4)

= 388 events with Magenta's defaults, or 413 with the paper's 125 shifts of 8 ms
(``PerformanceTokenizer.paper()``). Two more tokens, ``<s>`` and ``</s>``, follow the events for
language modelling; :meth:`PerformanceTokenizer.encode` returns events only.

Encoding quantises note times to the time step, writes a VELOCITY event only when the bin
changes, note-offs before note-ons at the same time, and time shifts of at most n steps.
Decoding pairs each NOTE_OFF with the earliest open note of its pitch; a NOTE_OFF with no open
note is skipped and a note still open at the end ends there (generated streams can hold both).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..atomic import atomic_write_text

NUM_PITCHES = 128


class PerformanceTokenizer:
    """Encode ``pretty_midi.PrettyMIDI`` to event ids and back."""

    def __init__(
        self, max_shift_steps: int = 100, step_ms: float = 10.0, velocity_bins: int = 32
    ) -> None:
        if not isinstance(max_shift_steps, int) or max_shift_steps < 1:
            raise ValueError(f"max_shift_steps must be an integer >= 1, got {max_shift_steps!r}")
        if not step_ms > 0:
            raise ValueError(f"step_ms must be > 0, got {step_ms!r}")
        if not isinstance(velocity_bins, int) or not 1 <= velocity_bins <= 127:
            raise ValueError(f"velocity_bins must be an integer in [1, 127], got {velocity_bins!r}")
        self.max_shift_steps = max_shift_steps
        self.step = step_ms / 1000.0
        self.step_ms = step_ms
        self.velocity_bins = velocity_bins
        self.bin_size = 128 // velocity_bins  # Magenta: velocity bins of equal width
        self.note_on_offset = 0
        self.note_off_offset = NUM_PITCHES
        self.shift_offset = 2 * NUM_PITCHES
        self.velocity_offset = self.shift_offset + max_shift_steps
        self.num_events = self.velocity_offset + velocity_bins
        self.start_id = self.num_events
        self.end_id = self.num_events + 1

    @classmethod
    def paper(cls) -> PerformanceTokenizer:
        """The original paper's 413 events: 125 time shifts of 8 ms."""
        return cls(max_shift_steps=125, step_ms=8.0)

    # -- names ----------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[str]:
        """All token names in id order: the events, then ``<s>`` and ``</s>``."""
        names = [f"NOTE_ON_{p}" for p in range(NUM_PITCHES)]
        names += [f"NOTE_OFF_{p}" for p in range(NUM_PITCHES)]
        names += [f"TIME_SHIFT_{s}" for s in range(1, self.max_shift_steps + 1)]
        names += [f"VELOCITY_{b}" for b in range(1, self.velocity_bins + 1)]
        return names + ["<s>", "</s>"]

    def ids_from_names(self, names: Iterable[str]) -> list[int]:
        """Token names -> ids; every unknown name is listed in the error."""
        index = {t: i for i, t in enumerate(self.tokens)}
        names = list(names)
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(
                f"not in the performance vocabulary: {unknown} (expected names like NOTE_ON_60, "
                f"TIME_SHIFT_10, VELOCITY_16)"
            )
        return [index[n] for n in names]

    def config(self) -> dict:
        return {
            "max_shift_steps": self.max_shift_steps,
            "step_ms": self.step_ms,
            "velocity_bins": self.velocity_bins,
        }

    def save_vocabulary(self, path: str | os.PathLike) -> None:
        """Write the configuration and token names as JSON (atomically)."""
        path = Path(path)
        data = json.dumps({"config": self.config(), "tokens": self.tokens}, indent=1)
        atomic_write_text(path, data)

    @classmethod
    def load_vocabulary(cls, path: str | os.PathLike) -> PerformanceTokenizer:
        data = json.loads(Path(path).read_text())
        tok = cls(**data["config"])
        if tok.tokens != data["tokens"]:
            raise ValueError(f"{path}: token list does not match its configuration")
        return tok

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> PerformanceTokenizer:
        """The tokenizer whose token list is ``tokens`` (as stored in a model checkpoint)."""
        shifts = sum(1 for t in tokens if t.startswith("TIME_SHIFT_"))
        bins = sum(1 for t in tokens if t.startswith("VELOCITY_"))
        for step_ms in (10.0, 8.0):
            tok = cls(shifts, step_ms, bins)
            if tok.tokens == list(tokens) and (shifts, step_ms) in ((100, 10.0), (125, 8.0)):
                return tok
        raise ValueError("token list is not a performance vocabulary (388 or 413 events)")

    def velocity_bin(self, velocity: int) -> int:
        """MIDI velocity 1..127 -> bin 1..velocity_bins."""
        return min((max(int(velocity), 1) - 1) // self.bin_size + 1, self.velocity_bins)

    def bin_velocity(self, bin_: int) -> int:
        """Bin -> the lowest velocity of the bin (Magenta's choice)."""
        return self.bin_size * (bin_ - 1) + 1

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, midi) -> list[int]:
        """Event ids of every non-drum note of a ``pretty_midi.PrettyMIDI``."""
        events: list[tuple[int, int, int, int]] = []  # (step, 0 off / 1 on, pitch, velocity)
        for inst in midi.instruments:
            if inst.is_drum:
                continue
            for note in inst.notes:
                start = int(round(note.start / self.step))
                end = int(round(note.end / self.step))
                end = max(end, start + 1)  # a note shorter than one step keeps one step
                events.append((start, 1, note.pitch, note.velocity))
                events.append((end, 0, note.pitch, note.velocity))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        ids: list[int] = []
        now, velocity_bin = 0, None
        for step, is_on, pitch, velocity in events:
            while step > now:
                shift = min(step - now, self.max_shift_steps)
                ids.append(self.shift_offset + shift - 1)
                now += shift
            if is_on:
                b = self.velocity_bin(velocity)
                if b != velocity_bin:
                    ids.append(self.velocity_offset + b - 1)
                    velocity_bin = b
                ids.append(self.note_on_offset + pitch)
            else:
                ids.append(self.note_off_offset + pitch)
        return ids

    def decode(self, ids: Iterable[int], program: int = 0):
        """Event ids (``<s>``/``</s>`` allowed and skipped) -> ``pretty_midi.PrettyMIDI``."""
        import pretty_midi

        pm = pretty_midi.PrettyMIDI()
        pm.instruments.append(self._decode_notes(ids, 0.0, program)[0])
        return pm

    def decode_many(self, sequences: Sequence[Iterable[int]], gap: float = 2.0, program: int = 0):
        """Several performances one after another, ``gap`` seconds apart, in one PrettyMIDI."""
        import pretty_midi

        pm = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=program)
        offset = 0.0
        for ids in sequences:
            part, end = self._decode_notes(ids, offset, program)
            inst.notes.extend(part.notes)
            offset = end + gap
        pm.instruments.append(inst)
        return pm

    def _decode_notes(self, ids: Iterable[int], offset: float, program: int):
        import pretty_midi

        inst = pretty_midi.Instrument(program=program)
        open_notes: dict[int, deque[tuple[int, int]]] = {}
        now, velocity = 0, self.bin_velocity(self.velocity_bins // 2 + 1)
        for position, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self.num_events + 2:
                raise ValueError(
                    f"event id {i} at position {position} outside [0, {self.num_events + 2})"
                )
            if i >= self.num_events:
                continue  # <s> or </s>
            if i < self.note_off_offset:
                open_notes.setdefault(i, deque()).append((now, velocity))
            elif i < self.shift_offset:
                pitch = i - self.note_off_offset
                if open_notes.get(pitch):
                    start, vel = open_notes[pitch].popleft()
                    inst.notes.append(self._note(pitch, vel, start, now, offset))
            elif i < self.velocity_offset:
                now += i - self.shift_offset + 1
            else:
                velocity = self.bin_velocity(i - self.velocity_offset + 1)
        for pitch, queue in open_notes.items():
            for start, vel in queue:
                inst.notes.append(self._note(pitch, vel, start, max(now, start + 1), offset))
        inst.notes.sort(key=lambda n: (n.start, n.pitch))
        return inst, offset + now * self.step

    def _note(self, pitch: int, velocity: int, start: int, end: int, offset: float):
        import pretty_midi

        end = max(end, start + 1)
        return pretty_midi.Note(
            velocity=velocity, pitch=pitch, start=offset + start * self.step,
            end=offset + end * self.step,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Data: Bach chorales from the music21 wheel, or a folder of MIDI files
# ---------------------------------------------------------------------------------------------


def _bach_limit(source: str) -> int | None:
    """N of a ``bach:N`` source (the first N chorales; None: ``bach``, all of them)."""
    if ":" not in source:
        return None
    text = source.split(":", 1)[1]
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"data source {source!r}: bach:N takes a count N >= 1, got {text!r}")
    return int(text)


def bach_chorale_files(limit: int | None = None) -> list[Path]:
    """The Bach chorales (MusicXML, .mxl) in the music21 wheel's corpus, sorted by name."""
    from .abc import music21_corpus_folder

    files = sorted((music21_corpus_folder() / "bach").glob("bwv*.mxl"))
    return files[:limit] if limit else files


def render_musicxml_to_midi(path: str | os.PathLike):
    """Parse a score with music21 and render it to MIDI (music21's own writer), as PrettyMIDI."""
    import music21
    import pretty_midi

    score = music21.converter.parse(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "score.mid"
        score.write("midi", fp=str(out))
        return pretty_midi.PrettyMIDI(str(out))


def load_sequences(
    sources: Sequence[str],
    tokenizer: PerformanceTokenizer,
    log: Callable[[str], None] = print,
) -> tuple[list[list[int]], str]:
    """``<s>`` + events + ``</s>`` for every performance of the sources, and a report.

    Sources: ``bach`` (every chorale of the music21 wheel), ``bach:N`` (the first N), or a
    folder or file of .mid/.midi. Files that cannot be read, or hold no notes, are counted.
    """
    import pretty_midi

    sequences: list[list[int]] = []
    failed: list[str] = []
    for source in sources:
        if source == "bach" or source.startswith("bach:"):
            limit = _bach_limit(source)
            items: list[tuple[str, Callable]] = [
                (f.name, lambda f=f: render_musicxml_to_midi(f)) for f in bach_chorale_files(limit)
            ]
        else:
            path = Path(source)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
                if not files:
                    raise FileNotFoundError(f"folder {path} has no .mid or .midi files")
            elif path.is_file():
                files = [path]
            else:
                raise FileNotFoundError(
                    f"performance source {source!r} is not bach, a file or folder"
                )
            items = [(str(f), lambda f=f: pretty_midi.PrettyMIDI(str(f))) for f in files]
        for name, read in items:
            try:
                midi = read()
            except Exception as err:  # MIDI and MusicXML readers raise many types on bad files
                failed.append(f"{name}: {type(err).__name__}: {err}")
                continue
            ids = tokenizer.encode(midi)
            if not ids:
                failed.append(f"{name}: no notes")
                continue
            sequences.append([tokenizer.start_id, *ids, tokenizer.end_id])
    report = f"{len(sequences)} performances read, {len(failed)} rejected"
    if failed:
        report += ":\n  " + "\n  ".join(failed[:20])
    return sequences, report
