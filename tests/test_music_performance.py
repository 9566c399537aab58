"""Performance RNN events: vocabulary layout, JSON, MIDI round trip of a real chorale, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnkern.music.performance import PerformanceTokenizer

pytestmark = pytest.mark.host_only  # nothing here needs a GPU (gpu_check.sh leaves it out)

pretty_midi = pytest.importorskip("pretty_midi", reason="MIDI needs the music extra")


def test_magenta_order_and_sizes():
    tok = PerformanceTokenizer()
    names = tok.tokens
    assert tok.num_events == 388 and len(names) == 390
    assert names[0] == "NOTE_ON_0" and names[127] == "NOTE_ON_127"
    assert names[128] == "NOTE_OFF_0" and names[255] == "NOTE_OFF_127"
    assert names[256] == "TIME_SHIFT_1" and names[355] == "TIME_SHIFT_100"
    assert names[356] == "VELOCITY_1" and names[387] == "VELOCITY_32"
    assert names[388:] == ["<s>", "</s>"]
    paper = PerformanceTokenizer.paper()
    assert paper.num_events == 413 and paper.tokens[380] == "TIME_SHIFT_125"
    assert paper.step == pytest.approx(0.008)


def test_vocabulary_json_round_trip(tmp_path):
    tok = PerformanceTokenizer.paper()
    tok.save_vocabulary(tmp_path / "vocab.json")
    again = PerformanceTokenizer.load_vocabulary(tmp_path / "vocab.json")
    assert again.tokens == tok.tokens and again.step_ms == 8.0
    assert PerformanceTokenizer.from_tokens(tok.tokens).num_events == 413
    with pytest.raises(ValueError, match="NOTE_ON_999"):
        tok.ids_from_names(["NOTE_ON_60", "NOTE_ON_999"])


@pytest.fixture(scope="module")
def chorale():
    """BWV 66.6 from the music21 wheel, rendered to MIDI by music21."""
    pytest.importorskip("music21", reason="the chorales ship inside the music21 wheel")
    from rnnkern.music.performance import bach_chorale_files, render_musicxml_to_midi

    path = next(f for f in bach_chorale_files() if f.name == "bwv66.6.mxl")
    return render_musicxml_to_midi(path)


@pytest.mark.parametrize("tok", [PerformanceTokenizer(), PerformanceTokenizer.paper()])
def test_real_midi_round_trip(chorale, tok):
    """Every note keeps its pitch, its onset and offset within one step, its velocity bin."""
    original = sorted(
        (n.pitch, n.start, n.end, n.velocity) for i in chorale.instruments for n in i.notes
    )
    assert len(original) > 100
    ids = tok.encode(chorale)
    decoded = tok.decode(ids)
    back = sorted(
        (n.pitch, n.start, n.end, n.velocity) for i in decoded.instruments for n in i.notes
    )
    assert len(back) == len(original)
    half = tok.step / 2 + 1e-9  # rounding to the nearest step moves a time by at most half
    for (p, s, e, v), (p2, s2, e2, v2) in zip(original, back, strict=True):
        assert p == p2
        assert abs(s - s2) <= half and abs(e - e2) <= half
        assert tok.velocity_bin(v) == tok.velocity_bin(v2)


def test_encode_short_notes_shifts_and_velocity_changes():
    tok = PerformanceTokenizer()
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.notes += [
        pretty_midi.Note(velocity=100, pitch=60, start=0.0, end=0.001),  # shorter than a step
        pretty_midi.Note(velocity=20, pitch=64, start=2.5, end=3.0),
    ]
    pm.instruments.append(inst)
    names = [tok.tokens[i] for i in tok.encode(pm)]
    assert names == [
        "VELOCITY_25", "NOTE_ON_60", "TIME_SHIFT_1", "NOTE_OFF_60",
        "TIME_SHIFT_100", "TIME_SHIFT_100", "TIME_SHIFT_49", "VELOCITY_5", "NOTE_ON_64",
        "TIME_SHIFT_50", "NOTE_OFF_64",
    ]  # fmt: skip


@settings(max_examples=100, deadline=2000)
@given(st.lists(st.integers(0, 389), max_size=200))
def test_any_event_stream_decodes_to_valid_midi(ids):
    tok = PerformanceTokenizer()
    pm = tok.decode(ids)
    for note in pm.instruments[0].notes:
        assert 0 <= note.pitch < 128 and 1 <= note.velocity <= 127 and note.end > note.start
    ons = sum(1 for i in ids if i < 128)
    assert len(pm.instruments[0].notes) == ons
    again = tok.decode(tok.encode(pm))
    assert len(again.instruments[0].notes) == ons


def test_bad_ids_are_named():
    with pytest.raises(ValueError, match="event id 390 at position 1"):
        PerformanceTokenizer().decode([0, 390])
