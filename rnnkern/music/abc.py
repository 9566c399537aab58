"""Folk-tune ABC tokenizer: folk-rnn's v2 vocabulary, its character-level v1 mode, and corpora.

folk-rnn (Sturm et al., 2016) models a tune as a sequence of ABC symbols after normalising it:
every tune is transposed so that its tonic is C (the mode is kept: K:Cmaj, K:Cmin, K:Cdor,
K:Cmix), the unit note length is 1/8, and ornaments, chord symbols, slurs, ties and titles are
removed. Each token is a piece of ABC text, so a token sequence joined with spaces is again
ABC. The vocabulary below is folk-rnn's v2 token set, 137 tokens.

Pipeline for one tune: :func:`split_tunes` cuts a file into tune texts, :func:`parse_tune` reads
headers and body into :class:`Event` s (pitches as diatonic step + alteration, durations as
exact fractions of an eighth note), and :func:`tokenize_tune` transposes them to C and spells
them as vocabulary tokens. :func:`detokenize` writes a complete tune (X:, T:, M:, L:, K:).
Anything the vocabulary cannot represent raises :class:`AbcError` naming the line and symbol.
"""

from __future__ import annotations

import importlib.util
import operator
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# The vocabulary (folk-rnn v2). One table per kind of token; VOCABULARY is their concatenation
# in a fixed order, so token ids are stable across releases.
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<s>", "</s>")
METER_TOKENS = ("M:2/4", "M:3/4", "M:4/4", "M:6/8", "M:9/8", "M:12/8", "M:3/2")
MODE_TOKENS = ("K:Cmaj", "K:Cmin", "K:Cdor", "K:Cmix")
# The note tokens folk-rnn's data contains after transposition to C: naturals from C, to b',
# and the accidentals that occur. A note outside this set cannot be represented.
NOTE_TOKENS = (
    # naturals, low to high
    "C,", "D,", "E,", "F,", "G,", "A,", "B,",
    "C", "D", "E", "F", "G", "A", "B",
    "c", "d", "e", "f", "g", "a", "b",
    "c'", "d'", "e'", "f'", "g'", "a'", "b'",
    # explicit naturals
    "=C,", "=E,", "=F,", "=G,", "=A,", "=B,",
    "=C", "=D", "=E", "=F", "=G", "=A", "=B",
    "=c", "=d", "=e", "=f", "=g", "=a", "=b",
    "=c'", "=e'", "=f'",
    # sharps
    "^C,", "^F,", "^G,", "^A,",
    "^C", "^D", "^F", "^G", "^A",
    "^c", "^d", "^f", "^g", "^a",
    "^c'", "^f'",
    # flats
    "_E,", "_A,", "_B,",
    "_C", "_D", "_E", "_G", "_A", "_B",
    "_c", "_d", "_e", "_g", "_a", "_b",
    "_d'", "_e'",
)  # fmt: skip
REST_TOKEN = "z"
# Durations in multiples of the unit length 1/8. A note of one unit has no duration token.
DURATION_TOKENS = (
    "2", "3", "4", "5", "6", "7", "8", "9", "12", "16",
    "/2", "/3", "/4", "/8", "3/2", "5/2", "7/2", "3/4",
)  # fmt: skip
# A broken rhythm, alone or fused with the duration of the note before it ("A2>B" is A 2> B).
BROKEN_TOKENS = ("<", ">", "2<", "2>", "4>", "/2<", "/2>")
BAR_TOKENS = ("|", "|:", ":|", "|1", "|2")
CHORD_TOKENS = ("[", "]")
TUPLET_TOKENS = ("(2", "(3", "(4", "(5", "(6", "(7", "(9")

VOCABULARY: tuple[str, ...] = (
    SPECIAL_TOKENS
    + METER_TOKENS
    + MODE_TOKENS
    + NOTE_TOKENS
    + (REST_TOKEN,)
    + DURATION_TOKENS
    + BROKEN_TOKENS
    + BAR_TOKENS
    + CHORD_TOKENS
    + TUPLET_TOKENS
)
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(VOCABULARY)}
assert len(VOCABULARY) == 137 and len(TOKEN_TO_ID) == 137, "folk-rnn v2 has 137 distinct tokens"

_NOTE_SET = frozenset(NOTE_TOKENS)
_DURATION_BY_VALUE: dict[Fraction, str] = {
    Fraction(t if "/" not in t or t[0] != "/" else "1" + t): t for t in DURATION_TOKENS
}
_DURATION_BY_VALUE[Fraction(1)] = ""
_DURATION_VALUE: dict[str, Fraction] = {t: v for v, t in _DURATION_BY_VALUE.items()}

# Meter spellings that folk-rnn's data writes as one of its meter tokens. Cut time (C|, 2/2)
# has the same bar length as 4/4 and thesession.org, folk-rnn's source, writes reels as 4/4.
METER_ALIASES = {"C": "4/4", "C|": "4/4", "2/2": "4/4"}

MODE_NAMES = {  # first three letters of an ABC mode word -> folk-rnn mode token
    "": "K:Cmaj", "maj": "K:Cmaj", "ion": "K:Cmaj", "m": "K:Cmin", "min": "K:Cmin",
    "aeo": "K:Cmin", "dor": "K:Cdor", "mix": "K:Cmix",
}  # fmt: skip
# Position of each mode relative to its major key on the circle of fifths.
_MODE_FIFTHS = {"K:Cmaj": 0, "K:Cmix": -1, "K:Cdor": -2, "K:Cmin": -3}
_UNSUPPORTED_MODES = ("lyd", "phr", "loc")

_LETTERS = "CDEFGAB"
_NATURAL_SEMITONES = (0, 2, 4, 5, 7, 9, 11)
_MAJOR_FIFTHS = {"C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5, "F": -1}
_SHARP_ORDER = "FCGDAEB"
_ACCIDENTAL_VALUE = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}
_ACCIDENTAL_TEXT = {1: "^", 0: "=", -1: "_"}
# Diatonic step of "C" (middle C, MIDI 60) counted from C in MIDI octave -1.
_MIDDLE_C_STEP = 5 * 7


class AbcError(ValueError):
    """ABC text the tokenizer cannot represent; names the line and the symbol."""

    def __init__(self, message: str, line: int | None = None, symbol: str | None = None):
        self.line = line
        self.symbol = symbol
        where = f"line {line}: " if line is not None else ""
        what = f"symbol {symbol!r}: " if symbol is not None else ""
        super().__init__(f"{where}{what}{message}")


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def key_signature(fifths: int) -> dict[int, int]:
    """Alteration per letter index (0 = C .. 6 = B) of a key with ``fifths`` sharps (<0: flats)."""
    if not -7 <= fifths <= 7:
        raise ValueError(f"fifths must be in [-7, 7], got {fifths}")
    sig: dict[int, int] = {}
    order = _SHARP_ORDER if fifths > 0 else _SHARP_ORDER[::-1]
    for letter in order[: abs(fifths)]:
        sig[_LETTERS.index(letter)] = 1 if fifths > 0 else -1
    return sig


@dataclass(frozen=True)
class Key:
    """A key from a K: field: tonic letter index, tonic alteration, folk-rnn mode token."""

    letter: int
    alteration: int
    mode: str

    @property
    def fifths(self) -> int:
        major = _MAJOR_FIFTHS[_LETTERS[self.letter]] + 7 * self.alteration
        return major + _MODE_FIFTHS[self.mode]

    @property
    def signature(self) -> dict[int, int]:
        return key_signature(self.fifths)


_KEY_RE = re.compile(r"^([A-G])([#b]?)\s*([A-Za-z]*)$")


def parse_key(value: str, line: int | None = None) -> Key:
    """Parse a K: field value such as ``G``, ``Ador``, ``F#m``, ``E Minor``, ``Bb mix``."""
    words = [w for w in value.split() if "=" not in w]  # clef=, middle= do not change pitch
    text = (
        " ".join(words[:2]) if len(words) >= 2 and words[1][:1].isalpha() else " ".join(words[:1])
    )
    if len(words) > 2 or (len(words) == 2 and text == words[0]):
        raise AbcError(
            f"key with extra accidentals or words is not supported: K:{value}", line, value
        )
    m = _KEY_RE.match(text.replace(" ", ""))
    if not m:
        raise AbcError(f"expected a key like K:G, K:Ador, K:F#m; got K:{value}", line, value)
    letter, accidental, mode_word = m.groups()
    mode_key = mode_word.lower()[:3] if mode_word.lower() not in ("m",) else "m"
    if mode_key in _UNSUPPORTED_MODES:
        raise AbcError("mode not in the vocabulary (maj, min, dor, mix only)", line, f"K:{value}")
    if mode_key not in MODE_NAMES:
        raise AbcError(f"unknown mode {mode_word!r}", line, f"K:{value}")
    key = Key(_LETTERS.index(letter), {"#": 1, "b": -1, "": 0}[accidental], MODE_NAMES[mode_key])
    if not -7 <= key.fifths <= 7:
        raise AbcError("key needs more than 7 sharps or flats", line, f"K:{value}")
    return key


def parse_meter(value: str, line: int | None = None) -> str:
    """Map an M: field value to a meter token (``M:6/8``); raises for meters folk-rnn lacks."""
    text = value.strip().replace(" ", "")
    text = METER_ALIASES.get(text, text)
    token = f"M:{text}"
    if token not in METER_TOKENS:
        raise AbcError(
            f"meter not in the vocabulary (which has {', '.join(METER_TOKENS)})",
            line,
            f"M:{value.strip()}",
        )
    return token


def _parse_fraction(value: str, line: int | None, what: str) -> Fraction:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or int(m.group(2)) == 0 or int(m.group(1)) == 0:
        raise AbcError(f"expected a fraction like 1/8 for {what}", line, f"{what}{value.strip()}")
    return Fraction(int(m.group(1)), int(m.group(2)))


def default_unit_length(meter_text: str) -> Fraction:
    """ABC's default L: a meter below 3/4 gets 1/16, otherwise 1/8."""
    text = meter_text.strip().replace(" ", "")
    text = METER_ALIASES.get(text, text)
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if m and Fraction(int(m.group(1)), int(m.group(2))) < Fraction(3, 4):
        return Fraction(1, 16)
    return Fraction(1, 8)


# ---------------------------------------------------------------------------------------------
# Parsing a tune into events
# ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    """One body symbol. ``kind`` is note, rest, bar, tuplet, chord_open, chord_close or broken.

    Notes carry ``step`` (diatonic step, C of MIDI octave -1 is 0) and ``alteration`` (the
    sounding alteration after key signature and bar accidentals). Notes, rests and chord_close
    carry ``duration`` in eighth notes. ``text`` is the source symbol for error messages.
    """

    kind: str
    line: int
    text: str
    duration: Fraction = Fraction(1)
    step: int = 0
    alteration: int = 0
    value: str = ""


@dataclass
class ParsedTune:
    """Headers and body events of one tune, before transposition."""

    title: str
    meter: str
    key: Key
    events: list[Event]
    number: str = ""


_DECORATION_CHARS = set("~.HLMOPSTuvJR")
_NOTE_RE = re.compile(r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)(\d*)(/*)(\d*)")
_REST_RE = re.compile(r"([zx])(\d*)(/*)(\d*)")
_DUR_RE = re.compile(r"(\d*)(/*)(\d*)")
_FIELD_RE = re.compile(r"^([A-Za-z]):(.*)$")
_BODY_FIELDS_IGNORED = set("PNRCOZSWwBDFGHIQT%")


def _duration(num: str, slashes: str, den: str, line: int, text: str) -> Fraction:
    n = int(num) if num else 1
    if not slashes:
        if den:
            raise AbcError("malformed duration", line, text)
        value = Fraction(n)
    elif den:
        if len(slashes) != 1:
            raise AbcError("malformed duration", line, text)
        if int(den) == 0:
            raise AbcError("duration with a zero denominator", line, text)
        value = Fraction(n, int(den))
    else:
        value = Fraction(n, 2 ** len(slashes))
    if value == 0:
        raise AbcError("zero duration", line, text)
    return value


def split_tunes(text: str) -> list[tuple[int, str]]:
    """Cut an ABC file into tunes at X: lines; returns (first line number, tune text) pairs."""
    tunes: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("X:"):
            if current:
                tunes.append((start, "\n".join(current)))
            current, start = [line], number
        elif current:
            current.append(line)
    if current:
        tunes.append((start, "\n".join(current)))
    return tunes


def parse_tune(text: str, first_line: int = 1) -> ParsedTune:
    """Read one tune's headers (M:, L:, K:, T:, X:) and body into events.

    Ornaments (grace notes, decorations), chord symbols and annotations, slurs, ties and beaming
    are dropped, as folk-rnn's data preparation does. Accidentals follow ABC: a written
    accidental holds for the same note until the end of the bar.
    """
    lines = text.splitlines()
    title = ""
    number = ""
    meter_text: str | None = None
    meter_token: str | None = None
    unit: Fraction | None = None
    key: Key | None = None
    body_start = None
    for i, raw in enumerate(lines):
        lineno = first_line + i
        line = raw.split("%", 1)[0].strip() if not raw.startswith("%%") else ""
        if not line:
            continue
        m = _FIELD_RE.match(line)
        if not m:
            raise AbcError("body text before the K: field", lineno, line[:20])
        name, value = m.group(1), m.group(2).strip()
        if name == "X":
            number = value
        elif name == "T" and not title:
            title = value
        elif name == "M":
            if value.lower() == "none":
                raise AbcError("tune without a meter", lineno, f"M:{value}")
            meter_text, meter_token = value, parse_meter(value, lineno)
        elif name == "L":
            unit = _parse_fraction(value, lineno, "L:")
        elif name == "K":
            key = parse_key(value, lineno)
            body_start = i + 1
            break
    if key is None or body_start is None:
        raise AbcError("tune has no K: field", first_line, "K:")
    if meter_token is None or meter_text is None:
        raise AbcError("tune has no M: field", first_line, "M:")
    if unit is None:
        unit = default_unit_length(meter_text)
    events = _parse_body(lines[body_start:], first_line + body_start, key, unit, meter_token)
    if not any(e.kind == "note" for e in events):
        raise AbcError(f"tune {title or number!r} has no notes", first_line)
    return ParsedTune(title, meter_token, key, events, number)


def _parse_body(
    lines: Sequence[str], first_line: int, key: Key, unit: Fraction, meter: str
) -> list[Event]:
    events: list[Event] = []
    signature = key.signature
    bar_accidentals: dict[int, int] = {}
    scale = unit * 8  # source units -> eighth notes
    chord_depth = 0
    for offset, raw in enumerate(lines):
        lineno = first_line + offset
        line = raw.split("%", 1)[0].rstrip()
        if line.endswith("\\"):
            line = line[:-1]
        if not line.strip():
            continue
        m = _FIELD_RE.match(line)
        if m and not line.startswith("|"):
            name, value = m.group(1), m.group(2).strip()
            if name == "L":
                unit = _parse_fraction(value, lineno, "L:")
                scale = unit * 8
            elif name == "M":
                if parse_meter(value, lineno) != meter:
                    raise AbcError("meter change inside a tune", lineno, f"M:{value}")
            elif name == "K":
                if parse_key(value, lineno) != key:
                    raise AbcError("key change inside a tune", lineno, f"K:{value}")
            elif name == "V":
                raise AbcError("tunes with several voices are not supported", lineno, line)
            elif name not in _BODY_FIELDS_IGNORED:
                raise AbcError("unknown field in the tune body", lineno, line)
            continue
        i = 0
        n = len(line)
        while i < n:
            c = line[i]
            if c in " \t`y-)":  # beaming, spacers, ties and slur ends carry no note
                i += 1
            elif c == '"':  # chord symbol or annotation
                j = line.find('"', i + 1)
                if j < 0:
                    raise AbcError("unterminated chord symbol or annotation", lineno, line[i:])
                i = j + 1
            elif c == "!" or c == "+":  # !trill! or +trill+ decoration
                j = line.find(c, i + 1)
                if j < 0 and c == "!":  # ABC 1.6 writes a lone "!" for a score line break
                    j = i
                elif j < 0:
                    raise AbcError("unterminated decoration", lineno, line[i:])
                i = j + 1
            elif c == "{":  # grace notes
                j = line.find("}", i + 1)
                if j < 0:
                    raise AbcError("unterminated grace notes", lineno, line[i:])
                i = j + 1
            elif c in _DECORATION_CHARS:
                i += 1
            elif c == "(":
                m = re.match(r"\((\d+)(:\d*)*", line[i:])
                if m is None:  # slur start
                    i += 1
                    continue
                if m.group(2) is not None or f"({m.group(1)}" not in TUPLET_TOKENS:
                    raise AbcError("tuplet not in the vocabulary", lineno, m.group(0))
                events.append(Event("tuplet", lineno, m.group(0), value=m.group(0)))
                i += m.end()
            elif c in "<>":
                m = re.match(r"[<>]+", line[i:])
                assert m is not None
                sym = m.group(0)
                if sym not in ("<", ">"):
                    raise AbcError("broken rhythm not in the vocabulary", lineno, sym)
                events.append(Event("broken", lineno, sym, value=sym))
                i += m.end()
            elif c in "|:[]" and not (
                c == "[" and i + 1 < n and line[i + 1] in "^_=ABCDEFGabcdefgz"
            ):
                i = _parse_bar_or_bracket(line, i, lineno, events, chord_depth)
                if events and events[-1].kind == "bar":
                    bar_accidentals.clear()
                if events and events[-1].kind == "chord_close":
                    chord_depth -= 1
                elif events and events[-1].kind == "chord_open":
                    chord_depth += 1
            elif c == "[":
                if chord_depth:
                    raise AbcError("nested chord", lineno, "[")
                events.append(Event("chord_open", lineno, "["))
                chord_depth += 1
                i += 1
            elif c in "zx":
                m = _REST_RE.match(line, i)
                assert m is not None
                if c == "x":
                    raise AbcError("invisible rest is not in the vocabulary", lineno, m.group(0))
                dur = _duration(m.group(2), m.group(3), m.group(4), lineno, m.group(0))
                events.append(Event("rest", lineno, m.group(0), duration=dur * scale))
                i = m.end()
            elif c in "^_=ABCDEFGabcdefg":
                m = _NOTE_RE.match(line, i)
                if m is None:
                    raise AbcError("accidental without a note", lineno, line[i : i + 3])
                acc, letter, octave_marks, num, slashes, den = m.groups()
                letter_index = _LETTERS.index(letter.upper())
                step = _MIDDLE_C_STEP + letter_index + (7 if letter.islower() else 0)
                step += 7 * octave_marks.count("'") - 7 * octave_marks.count(",")
                if acc is not None:
                    alteration = _ACCIDENTAL_VALUE[acc]
                    bar_accidentals[step] = alteration
                else:
                    alteration = bar_accidentals.get(step, signature.get(letter_index, 0))
                dur = _duration(num, slashes, den, lineno, m.group(0))
                events.append(
                    Event("note", lineno, m.group(0), dur * scale, step=step, alteration=alteration)
                )
                i = m.end()
            else:
                raise AbcError("symbol not representable in the folk-rnn vocabulary", lineno, c)
    if chord_depth:
        raise AbcError("chord not closed at the end of the tune", first_line + len(lines) - 1, "[")
    return events


# Bar lines as written -> folk-rnn tokens. Thin-thick and double bars only mark sections and
# last as long as a plain bar, so folk-rnn writes them as "|"; "::" is an end and a start repeat.
_BAR_SPELLINGS = {
    "|": ("|",), "||": ("|",), "|]": ("|",), "[|": ("|",), "[|]": ("|",),
    "|:": ("|:",), "||:": ("|:",), "[|:": ("|:",),
    ":|": (":|",), ":||": (":|",), ":|]": (":|",),
    "::": (":|", "|:"), ":|:": (":|", "|:"), ":||:": (":|", "|:"), ":|]:": (":|", "|:"),
    "|1": ("|1",), "|2": ("|2",), ":|1": (":|", "|1"), ":|2": (":|", "|2"),
    "[1": ("|1",), "[2": ("|2",), "|[1": ("|1",), "|[2": ("|2",),
    ":|[1": (":|", "|1"), ":|[2": (":|", "|2"), "||1": ("|1",), "||2": ("|2",),
    ":||2": (":|", "|2"), "|:1": ("|:",),
}  # fmt: skip
_BAR_RE = re.compile(r"[|:\[\]]+[12]?")


def _parse_bar_or_bracket(
    line: str, i: int, lineno: int, events: list[Event], chord_depth: int
) -> int:
    if line[i] == "]" and chord_depth:
        m = _DUR_RE.match(line, i + 1)
        assert m is not None
        dur = _duration(m.group(1), m.group(2), m.group(3), lineno, "]" + m.group(0))
        events.append(Event("chord_close", lineno, "]" + m.group(0), duration=dur))
        return m.end()
    if line[i] == "[" and re.match(r"\[[A-Za-z]:", line[i:]):
        raise AbcError("inline fields are not supported", lineno, line[i : line.find("]", i) + 1])
    m = _BAR_RE.match(line, i)
    assert m is not None
    text = m.group(0)
    # "[|" followed by a chord, or "|[" followed by a chord: split the bar from the bracket.
    if text not in _BAR_SPELLINGS and text.endswith("[") and text[:-1] in _BAR_SPELLINGS:
        text = text[:-1]
    if text not in _BAR_SPELLINGS:
        raise AbcError("bar line not in the vocabulary", lineno, text)
    for token in _BAR_SPELLINGS[text]:
        events.append(Event("bar", lineno, text, value=token))
    return i + len(text)


# ---------------------------------------------------------------------------------------------
# Transposition to C and spelling as tokens
# ---------------------------------------------------------------------------------------------


def _midi(step: int, alteration: int) -> int:
    octave, letter = divmod(step, 7)
    return 12 * octave + _NATURAL_SEMITONES[letter] + alteration


def note_token(step: int, alteration_text: str) -> str:
    """Spell a diatonic step (0 = C of MIDI octave -1) as ABC text, e.g. ``^c'`` or ``_B,``."""
    octave, letter = divmod(step, 7)
    name = _LETTERS[letter]
    if octave >= 6:  # step 42 is c, an octave above middle C
        return alteration_text + name.lower() + "'" * (octave - 6)
    return alteration_text + name + "," * (5 - octave)


def _transpositions(key: Key) -> list[tuple[int, int]]:
    """(diatonic steps, semitones) moving the tonic to C, nearest first, then an octave away."""
    tonic_semitones = _NATURAL_SEMITONES[key.letter] + key.alteration
    down = (-key.letter, -tonic_semitones)
    up = (7 - key.letter, 12 - tonic_semitones)
    candidates = [down, up, (down[0] - 7, down[1] - 12), (up[0] + 7, up[1] + 12)]
    return sorted(candidates, key=lambda c: abs(c[1]))


def tokenize_tune(tune: ParsedTune) -> list[str]:
    """Transpose a parsed tune to C (its mode kept) and spell it as vocabulary tokens.

    The transposition moves the tonic to the nearest C whose octave keeps every note inside
    the vocabulary. Returns ``["<s>", meter, mode, body..., "</s>"]``.
    """
    errors: list[AbcError] = []
    for steps, semitones in _transpositions(tune.key):
        try:
            body = _spell_body(tune, steps, semitones)
        except AbcError as err:
            errors.append(err)
            continue
        return ["<s>", tune.meter, tune.key.mode, *body, "</s>"]
    # Report the nearest transposition's error: it names the first unrepresentable symbol.
    raise errors[0]


def _spell_body(tune: ParsedTune, steps: int, semitones: int) -> list[str]:
    target_sig = key_signature(_MODE_FIFTHS[tune.key.mode])
    bar_accidentals: dict[int, int] = {}
    tokens: list[str] = []
    events = tune.events
    for index, ev in enumerate(events):
        if ev.kind == "note":
            step = ev.step + steps
            alteration = _midi(ev.step, ev.alteration) + semitones - _midi(step, 0)
            # Write an accidental whenever the note differs from the key signature, even if an
            # earlier accidental in the bar already implies it: readers that do not carry
            # accidentals through the bar (music21 among them) then hear the same notes.
            in_key = target_sig.get(step % 7, 0)
            expected = bar_accidentals.get(step, in_key)
            if alteration == expected == in_key:
                text = note_token(step, "")
            elif alteration in _ACCIDENTAL_TEXT:
                text = note_token(step, _ACCIDENTAL_TEXT[alteration])
                bar_accidentals[step] = alteration
            else:
                raise AbcError("double accidental after transposition to C", ev.line, ev.text)
            if text not in _NOTE_SET:
                raise AbcError(
                    f"note {text!r} after transposition to C is outside the vocabulary",
                    ev.line,
                    ev.text,
                )
            tokens.append(text)
            _append_duration(tokens, ev, events, index)
        elif ev.kind == "rest":
            tokens.append(REST_TOKEN)
            _append_duration(tokens, ev, events, index)
        elif ev.kind == "chord_close":
            tokens.append("]")
            _append_duration(tokens, ev, events, index)
        elif ev.kind == "chord_open":
            tokens.append("[")
        elif ev.kind == "bar":
            bar_accidentals.clear()
            tokens.append(ev.value)
        elif ev.kind == "tuplet":
            tokens.append(ev.value)
        elif ev.kind == "broken":
            prev = events[index - 1] if index else None
            if prev is None or prev.kind not in ("note", "rest", "chord_close"):
                raise AbcError("broken rhythm must follow a note, rest or chord", ev.line, ev.text)
            # the token was written together with the previous duration
        else:  # pragma: no cover - the parser makes no other kinds
            raise AssertionError(ev.kind)
    return tokens


def _append_duration(tokens: list[str], ev: Event, events: list[Event], index: int) -> None:
    duration = _DURATION_BY_VALUE.get(ev.duration)
    if duration is None:
        raise AbcError(f"duration {ev.duration} eighths is not in the vocabulary", ev.line, ev.text)
    nxt = events[index + 1] if index + 1 < len(events) else None
    if nxt is not None and nxt.kind == "broken":
        fused = duration + nxt.value
        if fused not in TOKEN_TO_ID:
            raise AbcError(
                "duration with broken rhythm not in the vocabulary", ev.line, ev.text + nxt.value
            )
        tokens.append(fused)
    elif duration:
        tokens.append(duration)


def tokenize(text: str, first_line: int = 1) -> list[str]:
    """Tokenize the text of one ABC tune (X: ... K: ... body) into folk-rnn v2 tokens."""
    return tokenize_tune(parse_tune(text, first_line))


def encode(tokens: Iterable[str]) -> list[int]:
    """Token strings -> ids; an unknown token raises naming it."""
    ids = []
    for position, token in enumerate(tokens):
        if token not in TOKEN_TO_ID:
            raise AbcError(f"token at position {position} is not in the vocabulary", None, token)
        ids.append(TOKEN_TO_ID[token])
    return ids


def decode(ids: Iterable[int]) -> list[str]:
    """Token ids (ints, or 0-d integer tensors) -> token strings; an id outside [0, 137) or
    not an integer raises naming it."""
    out = []
    for position, i in enumerate(ids):
        try:
            index = operator.index(i)  # (int(1.7) and int("3") would have passed)
        except TypeError:
            raise TypeError(
                f"token ids must be integers, got {i!r} at position {position}"
            ) from None
        if not 0 <= index < len(VOCABULARY):
            raise ValueError(f"token id {i} at position {position} outside [0, {len(VOCABULARY)})")
        out.append(VOCABULARY[index])
    return out


# ---------------------------------------------------------------------------------------------
# Detokenizing
# ---------------------------------------------------------------------------------------------

_MODE_ABC = {"K:Cmaj": "C", "K:Cmin": "Cm", "K:Cdor": "Cdor", "K:Cmix": "Cmix"}
_GLUE_BEFORE = set(DURATION_TOKENS) | set(BROKEN_TOKENS) | {"]"}
# A chord the tokens leave open is closed before these (the corpora hold rests, tuplets and
# broken rhythms inside chords, but never a bar line or a second chord).
_CHORD_ENDERS = set(BAR_TOKENS) | {"["}


def body_tokens(tokens: Sequence[str]) -> tuple[str | None, str | None, list[str]]:
    """Split a token sequence into (meter, mode, body), dropping <s> and </s>."""
    seq = [t for t in tokens if t not in SPECIAL_TOKENS]
    meter = next((t for t in seq if t in METER_TOKENS), None)
    mode = next((t for t in seq if t in MODE_TOKENS), None)
    body = [t for t in seq if t not in METER_TOKENS and t not in MODE_TOKENS]
    return meter, mode, body


def detokenize(
    tokens: Sequence[str],
    number: int = 1,
    title: str = "",
    meter: str | None = None,
    mode: str | None = None,
) -> str:
    """Write tokens as a complete ABC tune with X:, T:, M:, L:1/8 and K: headers.

    Meter and mode come from the tokens (or the arguments when the tokens have none; then
    M:4/4 and K:C are the defaults). Tokens are separated by spaces except where ABC needs
    them joined: a note and its duration or broken rhythm, a tuplet mark and its first note,
    the inside of a chord, and a repeat end followed by an ending (``:|2``).

    A model can emit unbalanced chord brackets, which ABC readers reject (music21: "Bad chord
    indicator"), so a chord the tokens leave open is closed before the next bar line or ``[``
    or at the end, and a ``]`` with no open chord is left out. So is every other token that
    :func:`interpret` (and so the MIDI export) ignores, such as a duration with nothing to
    lengthen (after a bar line or another duration: ``E 2 3``) or an empty chord: written, it
    would change what the text means (``E23`` is a note of 23 eighths to an ABC reader, and
    a model's output had it).
    """
    token_meter, token_mode, body = body_tokens(tokens)
    meter = token_meter or meter or "M:4/4"
    mode = token_mode or mode or "K:Cmaj"
    if meter not in METER_TOKENS:
        raise ValueError(f"meter must be one of {METER_TOKENS}, got {meter!r}")
    if mode not in MODE_TOKENS:
        raise ValueError(f"mode must be one of {MODE_TOKENS}, got {mode!r}")
    for token in body:
        if token not in TOKEN_TO_ID:
            raise AbcError("token is not in the vocabulary", None, token)
    ignored = _read(tokens)[2]
    parts: list[str] = []
    glue_next = False
    in_chord = False
    for index, token in enumerate(body):
        if in_chord and token in _CHORD_ENDERS:  # (an ignored "[" too: it ends the chord)
            parts[-1] += "]"
            in_chord = glue_next = False
        if index in ignored:  # (a "]" with no chord among them)
            continue
        if token in CHORD_TOKENS:
            in_chord = token == "["
        if parts and token == "|2" and parts[-1] == ":|":
            parts[-1] = ":|2"
        elif parts and token == "|1" and parts[-1] == ":|":
            parts[-1] = ":|1"
        elif parts and ((glue_next and token not in BAR_TOKENS) or token in _GLUE_BEFORE):
            parts[-1] += token
        else:
            parts.append(token)
        glue_next = (
            token in TUPLET_TOKENS
            or token in BROKEN_TOKENS
            or token == "["
            or _inside_chord(parts[-1])  # (notes, rests and their durations)
        )
    if in_chord:
        parts[-1] += "]"
    title = title or f"Tune {number}"
    header = f"X:{number}\nT:{title}\n{meter}\nL:1/8\nK:{_MODE_ABC[mode]}\n"
    return header + _wrap(parts) + "\n"


def _inside_chord(part: str) -> bool:
    return part.rfind("[") > part.rfind("]")


def _wrap(parts: list[str], bars_per_line: int = 8) -> str:
    lines, current, bars = [], [], 0
    for part in parts:
        current.append(part)
        if part.startswith(("|", ":|")) and not _inside_chord(part):
            bars += 1
            if bars == bars_per_line:
                lines.append(" ".join(current))
                current, bars = [], 0
    if current:
        lines.append(" ".join(current))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Durations (used by the quality measure: do inner bars last what the meter says?)
# ---------------------------------------------------------------------------------------------


def meter_signature(meter: str) -> tuple[int, int]:
    """Numerator and denominator of a meter token (``M:6/8``: 6, 8)."""
    num, den = meter[2:].split("/")
    return int(num), int(den)


def meter_bar_length(meter: str) -> Fraction:
    """Length of one bar of a meter token, in eighth notes."""
    num, den = meter_signature(meter)
    return Fraction(num * 8, den)


_COMPOUND = {"M:6/8", "M:9/8", "M:12/8"}


@dataclass
class Sounding:
    """A note, chord or rest read from tokens: MIDI pitches (empty for a rest), start and length
    in eighth notes, and the index of its bar."""

    pitches: tuple[int, ...]
    start: Fraction
    length: Fraction
    bar: int


_NOTE_TEXT_RE = re.compile(r"([=^_]?)([A-Ga-g])([,']*)")


def _note_step(token: str) -> tuple[str, int]:
    m = _NOTE_TEXT_RE.fullmatch(token)
    assert m is not None, token
    acc, letter, marks = m.groups()
    step = _MIDDLE_C_STEP + _LETTERS.index(letter.upper()) + (7 if letter.islower() else 0)
    return acc, step + 7 * marks.count("'") - 7 * marks.count(",")


def interpret(tokens: Sequence[str]) -> tuple[list[Sounding], list[Fraction | None]]:
    """Read a token sequence as music: what sounds when, and the length of every bar.

    The one reading of tokens used for MIDI export and for the bar-length quality measure.
    ABC's rules: accidentals hold to the end of the bar; a broken rhythm makes the note before
    it 3/2 (``>``) or 1/2 (``<``) as long and the note after it the rest of the pair; ``(p``
    puts p notes in the time of q (q = 3 for p = 2, 4, 8; 2 for 3 and 6; otherwise 3 in
    compound meters and 2 in others); a chord lasts as long as its first note times the
    duration after ``]``. A bar with a symbol out of place (a duration with no note, ``]``
    with no chord) has length None; its notes are still returned.
    """
    items, bars, _ = _read(tokens)
    return items, bars


def _read(tokens: Sequence[str]) -> tuple[list[Sounding], list[Fraction | None], set[int]]:
    """:func:`interpret`, and the indices into :func:`body_tokens`' body of the tokens the
    reading ignores (out of place: a duration after a bar line or after another duration, a
    chord with no notes, ``]`` with no chord, a tuplet inside a chord...), which
    :func:`detokenize` leaves out, so that the ABC it writes means what this reading hears.
    A chord left open ends at the next bar line, ``[`` or the end, as detokenize closes it."""
    meter, mode, body = body_tokens(tokens)
    compound = meter in _COMPOUND
    signature = key_signature(_MODE_FIFTHS[mode or "K:Cmaj"])
    bar_accidentals: dict[int, int] = {}
    items: list[Sounding] = []
    bars: list[Fraction | None] = []
    bar_start = 0  # index in items of the current bar's first item
    broken_factor = Fraction(1)  # what a broken rhythm leaves for the next item
    tuplet_left, tuplet_ratio = 0, Fraction(1)
    bad = False
    open_item = False  # the last item (or chord note) may still take a duration
    chord: list[tuple[int | None, Fraction]] | None = None  # notes inside an open chord
    chord_at = -1  # body index of the open chord's "["
    ignored: set[int] = set()

    def pitch(token: str) -> int | None:
        if token == REST_TOKEN:
            return None
        acc, step = _note_step(token)
        if acc:
            bar_accidentals[step] = _ACCIDENTAL_VALUE[acc]
        alteration = bar_accidentals.get(step, signature.get(step % 7, 0))
        return _midi(step, alteration)

    def start_item(pitches: tuple[int, ...], length: Fraction) -> None:
        nonlocal broken_factor, tuplet_left
        factor = broken_factor
        broken_factor = Fraction(1)
        if tuplet_left:
            factor *= tuplet_ratio
            tuplet_left -= 1
        items.append(Sounding(pitches, Fraction(0), length * factor, len(bars)))

    def end_chord(explicit: bool) -> None:
        # a chord with notes becomes one item (as long as its first note); one without is
        # ignored, its "[" with it; one the tokens leave open is malformed (its bar unread)
        nonlocal chord, open_item, bad
        if chord:
            notes = tuple(sorted({p for p, _ in chord if p is not None}))
            start_item(notes, chord[0][1])
        else:
            ignored.add(chord_at)
        bad = bad or not explicit or not chord
        chord, open_item = None, bool(chord) and explicit

    def close_bar() -> None:
        nonlocal bar_start, bad, open_item, broken_factor
        if chord is not None:
            end_chord(explicit=False)
        lengths = [it.length for it in items[bar_start:]]
        bars.append(None if bad else sum(lengths, Fraction(0)))
        bar_start, bad, open_item = len(items), False, False
        broken_factor = Fraction(1)
        bar_accidentals.clear()

    for index, token in enumerate(body):
        if token in BAR_TOKENS:
            close_bar()
        elif chord is not None and token != "[":
            if token in _NOTE_SET or token == REST_TOKEN:
                chord.append((pitch(token), Fraction(1)))
                open_item = True
            elif token in _DURATION_VALUE and open_item:
                chord[-1] = (chord[-1][0], chord[-1][1] * _DURATION_VALUE[token])
                open_item = False
            elif token == "]":
                if not chord:
                    ignored.add(index)
                end_chord(explicit=True)
            else:
                bad = True
                ignored.add(index)
        elif token in _NOTE_SET or token == REST_TOKEN:
            p = pitch(token)
            start_item(() if p is None else (p,), Fraction(1))
            open_item = True
        elif token == "[":
            if chord is not None:
                end_chord(explicit=False)
            chord, chord_at, open_item = [], index, False
        elif token in _DURATION_VALUE and open_item:
            items[-1].length *= _DURATION_VALUE[token]
            open_item = False
        elif token in BROKEN_TOKENS and open_item and _starts_item(body, index + 1):
            first, broken_factor = (
                (Fraction(3, 2), Fraction(1, 2))
                if token[-1] == ">"
                else (Fraction(1, 2), Fraction(3, 2))
            )
            items[-1].length *= _DURATION_VALUE[token[:-1]] * first
            open_item = False
        elif token in TUPLET_TOKENS:
            p = int(token[1:])
            q = 3 if p in (2, 4, 8) else 2 if p in (3, 6) else (3 if compound else 2)
            tuplet_left, tuplet_ratio, open_item = p, Fraction(q, p), False
        else:
            bad = True
            ignored.add(index)
    close_bar()
    time = Fraction(0)
    for item in items:
        item.start = time
        time += item.length
    return items, bars, ignored


def _starts_item(body: Sequence[str], index: int) -> bool:
    """Whether ``body[index]`` begins a note, rest or chord (one with a note or rest before it
    ends: an empty one is ignored): what a broken rhythm needs after it (before a bar line, a
    tuplet or the end, ABC readers leave the note before it as it is; music21 read ``C> |`` as
    one eighth)."""
    if index < len(body) and body[index] == "[":
        for token in body[index + 1 :]:
            if token in _NOTE_SET or token == REST_TOKEN:
                return True
            if token in _CHORD_ENDERS or token == "]":
                return False
        return False
    return index < len(body) and (body[index] in _NOTE_SET or body[index] == REST_TOKEN)


def played_tokens(tokens: Sequence[str]) -> list[str]:
    """What :func:`tokenize` reads back from :func:`detokenize`'s text of ``tokens``: the
    header (its defaults where the tokens have none) and the body without the tokens that
    :func:`interpret` ignores (out of place), which the text leaves out."""
    meter, mode, body = body_tokens(tokens)
    ignored = _read(tokens)[2]
    kept = [t for i, t in enumerate(body) if i not in ignored]
    return ["<s>", meter or "M:4/4", mode or "K:Cmaj", *kept, "</s>"]


def bar_durations(tokens: Sequence[str]) -> list[Fraction | None]:
    """Length in eighths of every bar of a token sequence (None for a bar that cannot be read)."""
    return interpret(tokens)[1]


# ---------------------------------------------------------------------------------------------
# Character-level mode (folk-rnn v1)
# ---------------------------------------------------------------------------------------------


def tune_text_for_chars(text: str) -> str:
    """The text folk-rnn v1 models: a tune's header and body lines without comments or X:."""
    lines = []
    for line in text.splitlines():
        line = line.split("%", 1)[0].rstrip()
        if line and not line.startswith("X:"):
            lines.append(line)
    return "\n".join(lines)


@dataclass
class CharVocabulary:
    """Character-level vocabulary: <s>, </s> and every character of the training texts."""

    chars: list[str]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocabulary:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def tokens(self) -> list[str]:
        return [*SPECIAL_TOKENS, *self.chars]

    def encode(self, text: str) -> list[int]:
        """<s>, one id per character, </s>; an unknown character raises naming it."""
        index = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(self.chars)}
        ids = [0]
        for position, ch in enumerate(text):
            if ch not in index:
                line = text.count("\n", 0, position) + 1
                raise AbcError("character not in the vocabulary", line, ch)
            ids.append(index[ch])
        return ids + [1]

    def decode(self, ids: Iterable[int]) -> str:
        tokens = self.tokens
        out = []
        for i in ids:
            if not 0 <= int(i) < len(tokens):
                raise ValueError(f"character id {i} outside [0, {len(tokens)})")
            if int(i) >= len(SPECIAL_TOKENS):
                out.append(tokens[int(i)])
        return "".join(out)


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------

# ABC collections inside the music21 wheel (folder under music21/corpus). music21 is BSD-3;
# its corpus licence says each encoding is distributed with the encoder's permission. The
# tunes themselves (1778-1907 publications and Essen folk-song transcriptions) are in the
# public domain; the encodings' own notes (Z: lines) name their transcribers.
MUSIC21_COLLECTIONS = {
    "oneills1850": "O'Neill's Music of Ireland (1903), 1850 melodies; transcribed by Norbert Paap",
    "ryansMammoth": "Ryan's Mammoth Collection (1883); transcribed by the Ryan's project",
    "airdsAirs": "Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-1803); "
    "transcribed by Jack Campin",
    "essenFolksong": "Essen Folksong Collection (Helmut Schaffrath), ABC conversion",
}


def music21_corpus_folder() -> Path:
    """The corpus folder of the installed music21 package, found without importing it."""
    spec = importlib.util.find_spec("music21")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "music21 is not installed: install rnnkern[music] to use the bundled corpora"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "corpus"


@dataclass
class Tune:
    """One tune of a corpus: where it came from, its text and (when accepted) its tokens."""

    source: str
    file: str
    line: int
    text: str
    tokens: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Rejection:
    """A tune the tokenizer could not represent, and why."""

    tune: Tune
    error: AbcError


@dataclass
class Corpus:
    """Tokenized tunes and the tunes that were rejected (never dropped silently)."""

    tunes: list[Tune]
    rejected: list[Rejection]

    def report(self) -> str:
        """A summary per source and the most frequent rejection reasons."""
        accepted = Counter(t.source for t in self.tunes)
        rejected = Counter(r.tune.source for r in self.rejected)
        lines = []
        for source in sorted(set(accepted) | set(rejected)):
            lines.append(f"{source}: {accepted[source]} tunes kept, {rejected[source]} rejected")
        reasons = Counter(_reason(r.error) for r in self.rejected)
        for reason, count in reasons.most_common(10):
            lines.append(f"  rejected {count:5d}: {reason}")
        total = len(self.tunes) + len(self.rejected)
        lines.append(
            f"total: {len(self.tunes)} of {total} tunes kept, {len(self.rejected)} rejected"
        )
        return "\n".join(lines)


def _reason(error: AbcError) -> str:
    text = str(error)
    text = re.sub(r"^line \d+: ", "", text)
    return re.sub(r"^symbol '.*?': ", "", text)[:100]


def read_abc_files(paths: Iterable[Path], source: str, root: Path | None = None) -> list[Tune]:
    """Every tune of the given .abc files (text decoded as UTF-8, Latin-1 as a fallback)."""
    tunes = []
    for path in sorted(paths):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # older ABC files are Latin-1; every byte decodes
        name = str(path.relative_to(root)) if root else path.name
        for line, tune_text in split_tunes(text):
            tunes.append(Tune(source, name, line, tune_text))
    return tunes


def load_tunes(sources: Sequence[str]) -> list[Tune]:
    """Tunes from music21 collections (by name, or ``music21`` for all four) and folders/files."""
    tunes: list[Tune] = []
    for source in sources:
        names = list(MUSIC21_COLLECTIONS) if source == "music21" else [source]
        for name in names:
            if name in MUSIC21_COLLECTIONS:
                folder = music21_corpus_folder() / name
                tunes += read_abc_files(folder.glob("*.abc"), name, folder.parent)
                continue
            path = Path(name)
            if path.is_dir():
                files = list(path.rglob("*.abc"))
                if not files:
                    raise FileNotFoundError(f"corpus folder {path} has no .abc files")
                tunes += read_abc_files(files, str(path), path)
            elif path.is_file():
                tunes += read_abc_files([path], str(path), path.parent)
            else:
                hint = (
                    " ('bach' is MIDI performance data: --kind performance)"
                    if name == "bach" or name.startswith("bach:")
                    else ""
                )
                raise FileNotFoundError(
                    f"corpus source {name!r} is neither a music21 collection "
                    f"({', '.join(MUSIC21_COLLECTIONS)}, music21) nor a file or folder{hint}"
                )
    return tunes


def tokenize_corpus(tunes: Iterable[Tune]) -> Corpus:
    """Tokenize every tune; the ones that fail are kept as rejections with their error."""
    kept, rejected = [], []
    for tune in tunes:
        try:
            tune.tokens = tokenize(tune.text, tune.line)
        except AbcError as err:
            rejected.append(Rejection(tune, err))
            continue
        kept.append(tune)
    return Corpus(kept, rejected)


def load_corpus(sources: Sequence[str]) -> Corpus:
    """Load and tokenize tunes from music21 collections and user folders; see :func:`load_tunes`."""
    return tokenize_corpus(load_tunes(sources))
