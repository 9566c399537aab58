"""Generation: seeded determinism, meter/mode/prime controls, MIDI export, CLI smoke tests."""

from __future__ import annotations

import pytest
import torch

from rnnkern.cli import main
from rnnkern.music import abc
from rnnkern.music.cli import DEFAULT_MODEL
from rnnkern.music.generate import sample_sequences, sample_sequences_stepwise
from rnnkern.music.model import ModelConfig, MusicLM
from rnnkern.music.train import CHECKPOINT_FORMAT, save_checkpoint

pretty_midi = pytest.importorskip("pretty_midi", reason="MIDI export needs the music extra")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An untrained folk model file: enough to test the machinery, fast."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(abc.VOCABULARY), embedding_dim=8, hidden_size=16)
    model = MusicLM(config)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "kind": "abc", "tokens": list(abc.VOCABULARY),
        "model_config": config.to_dict(), "train_config": {}, "model": model.state_dict(),
        "history": {"val_loss": []},
    })  # fmt: skip
    return model, path


def test_same_seed_same_tunes_other_seed_other_tunes(random_model):
    model, _ = random_model
    kw = dict(max_tokens=60, end_id=1)
    a = sample_sequences(model, [0], 3, seed=7, **kw)
    b = sample_sequences(model, [0], 3, seed=7, **kw)
    c = sample_sequences(model, [0], 3, seed=8, **kw)
    assert a == b and a != c
    # stream b of a batch is the same tune whatever the batch size
    assert sample_sequences(model, [0], 1, seed=7, **kw)[0] == a[0]
    forced = sample_sequences(model, [0], 2, seed=7, forced={2: 5}, **kw)
    assert all(s[2] == 5 for s in forced)


@pytest.mark.parametrize("embedding_dim", [8, 0])
@pytest.mark.parametrize("kw", [{}, {"top_k": 5, "temperature": 0.8}, {"top_p": 0.9}])
def test_decoder_generation_equals_stepping_the_module(embedding_dim, kw):
    """sample_sequences runs rnnkern.Decoder (weights packed once, the loop in C++, in chunks
    continued with first_step); stepping the nn.Module in Python with the same sampling rule
    must give the same tokens. One-hot models (embedding_dim 0) go through an identity
    embedding. The logits of the two paths differ only by float32 rounding, so a token could
    differ only if a uniform fell within ~1e-7 of a cumulative boundary; these seeds do not."""
    torch.manual_seed(3)
    config = ModelConfig(
        vocab_size=len(abc.VOCABULARY), embedding_dim=embedding_dim, hidden_size=24, num_layers=2
    )
    model = MusicLM(config)
    prefix = [0, abc.TOKEN_TO_ID["M:6/8"]]
    fast = sample_sequences(model, prefix, 3, seed=11, max_tokens=42, end_id=None, chunk=16, **kw)
    slow = sample_sequences_stepwise(model, prefix, 3, seed=11, steps=40, **kw)
    assert fast == slow


def _decoder_missing(backend: str) -> str | None:
    """Why Decoder(backend=...) cannot run here, or None."""
    if backend == "cpu":
        from rnnkern.backends import cpu

        return None if cpu._cpu is not None else "rnnkern._cpu is not built"
    from rnnkern.backends import cuda_decode

    return cuda_decode.unavailable_reason(torch.device("cuda"))


@pytest.mark.parametrize(
    "decoder",
    ["torch"] + [
        pytest.param(d, marks=pytest.mark.skipif(
            _decoder_missing(d) is not None, reason=f"--decoder {d}: {_decoder_missing(d)}"))
        for d in ("cpu", "cuda")
    ],
)  # fmt: skip
def test_decoder_backends_give_the_same_tunes(random_model, decoder):
    """--decoder picks the Decoder backend; all follow the same sampling rule and generator,
    so the tunes agree (their logits differ only by float32 rounding; these seeds do not sit
    on a boundary). The prime and forced tokens go to the decoder's device."""
    model, _ = random_model
    kw = dict(max_tokens=60, end_id=1, forced={3: 5}, top_k=6, chunk=16)
    expected = sample_sequences_stepwise(model, [0], 2, seed=9, steps=59, top_k=6)
    got = sample_sequences(model, [0], 2, seed=9, decoder=decoder, **kw)
    # the forced token changes what follows it: compare the tokens before it with stepping
    # the module, the whole tunes with the torch decoder, then determinism
    assert [s[:3] for s in got] == [s[:3] for s in expected]
    assert all(s[3] == 5 for s in got)
    assert got == sample_sequences(model, [0], 2, seed=9, decoder="torch", **kw)
    assert got == sample_sequences(model, [0], 2, seed=9, decoder=decoder, **kw)


def test_unavailable_decoder_is_a_clear_error(random_model, capsys):
    _, path = random_model
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --decoder cuda can run here")
    rc = main(["generate", "--model", str(path), "--decoder", "cuda", "--max-tokens", "20"])
    assert rc == 2
    assert "--decoder cuda runs on a CUDA device, and none is visible" in capsys.readouterr().err


def test_cli_generate_controls_and_midi(random_model, tmp_path, capsys):
    _, path = random_model
    midi = tmp_path / "out.mid"
    args = ["generate", "--model", str(path), "--seed", "5", "--count", "2", "--meter", "6/8",
            "--mode", "dor", "--prime", "c2 G E|", "--max-tokens", "40",
            "--midi", str(midi)]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.count("X:") == 2 and "M:6/8\nL:1/8\nK:Cdor\nc2 G E |" in first
    pm = pretty_midi.PrettyMIDI(str(midi))
    assert pm.get_tempo_changes()[1][0] == pytest.approx(120.0)
    signatures = [(t.numerator, t.denominator) for t in pm.time_signature_changes]
    assert signatures == [(6, 8), (6, 8)]  # each tune's meter where it starts
    assert pm.instruments[0].notes[0].pitch == 72  # the prime's c
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--meter", "6/8", "--mode", "maj", "--prime", "c2 ^^E w|"], "'w'"),
        (["--meter", "6/8", "--mode", "maj", "--prime", "c 2 G ^^E"], "^^E"),
        (["--meter", "5/4"], "--meter must be one of"),
        (["--mode", "lydian"], "--mode must be one of"),
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be an int >= 0"),
        (["--prime", "c2"], "--prime needs --meter and --mode"),
    ],
)
def test_cli_generate_errors_name_the_problem(random_model, capsys, extra, message):
    _, path = random_model
    assert main(["generate", "--model", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_midi_path_that_cannot_be_written_is_refused_first(random_model, tmp_path, capsys):
    _, path = random_model
    (tmp_path / "a.txt").write_text("x")
    midi = tmp_path / "a.txt" / "x.mid"
    assert main(["generate", "--model", str(path), "--midi", str(midi)]) == 2
    assert "a.txt is a file, not a folder" in capsys.readouterr().err


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bundled_model_generates_tunes_music21_reads(capsys):
    """The README's command: the bundled model, no other file."""
    music21 = pytest.importorskip("music21")
    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 8 * 2**20
    assert main(["generate", "--seed", "1", "--count", "2"]) == 0
    out = capsys.readouterr().out
    tunes = ["X:" + t for t in out.split("X:")[1:]]
    assert len(tunes) == 2
    for text in tunes:
        score = music21.converter.parse(text, format="abc")
        assert len(score.recurse().notes) > 0


def test_train_and_generate_performance_cli(tmp_path, capsys):
    """A tiny performance model trained on one chorale writes MIDI directly."""
    pytest.importorskip("music21", reason="the chorales ship inside the music21 wheel")
    out = tmp_path / "perf"
    assert main(["train", "--kind", "performance", "--data", "bach:2", "--out", str(out),
                 "--epochs", "1", "--hidden", "16", "--embedding", "8", "--window", "64",
                 "--val-fraction", "0.5", "--quiet"]) == 0  # fmt: skip
    midi = tmp_path / "perf.mid"
    assert main(["generate", "--model", str(out / "model.pt"), "--max-tokens", "80",
                 "--midi", str(midi)]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    assert pretty_midi.PrettyMIDI(str(midi)).instruments
    assert main(["generate", "--model", str(out / "model.pt"), "--meter", "6/8"]) == 2
    assert main(["generate", "--model", str(out / "model.pt"), "--prime", "NOTE_ON_60 FOO",
                 "--midi", str(midi)]) == 2  # fmt: skip
    assert "FOO" in capsys.readouterr().err
    # A performance writes only MIDI, at its own timing: without --midi it had written
    # ./performance.mid over any file of that name, and --tempo was silently ignored.
    assert main(["generate", "--model", str(out / "model.pt")]) == 2
    assert "name the file with --midi" in capsys.readouterr().err
    assert main(["generate", "--model", str(out / "model.pt"), "--midi", str(midi),
                 "--tempo", "60"]) == 2  # fmt: skip
    assert "--tempo applies to folk (ABC) models" in capsys.readouterr().err


def test_generate_refuses_what_it_cannot_do_before_any_work(tmp_path, capsys):
    """Each of these gave a traceback (a --midi directory, a model whose weights do not fit
    its configuration, a tempo MIDI cannot hold: after the tunes were printed) or a token of
    -1 (a temperature so small that the scaled logits overflowed): now exit 2 and a message
    naming the argument, with nothing printed or written."""
    folder = tmp_path / "out"
    folder.mkdir()
    cases = [
        (["--midi", str(folder)], "--midi must name a file, got the directory"),
        (["--temperature", "1e-310"], "temperature must be at least"),
        (["--midi", str(tmp_path / "t.mid"), "--tempo", "3"], "--tempo must be in [3.58, "),
        (["--model", str(tmp_path)], "is a directory, not a model file"),
    ]
    state = torch.load(DEFAULT_MODEL, weights_only=True)
    state["model_config"]["hidden_size"] *= 2
    torch.save(state, tmp_path / "edited.pt")
    cases.append((["--model", str(tmp_path / "edited.pt")], "weights do not fit its model"))
    del state["tokens"]
    torch.save(state, tmp_path / "tokenless.pt")
    cases.append((["--model", str(tmp_path / "tokenless.pt")], "it lacks ['tokens']"))
    (tmp_path / "empty.pt").write_bytes(b"")
    cases.append((["--model", str(tmp_path / "empty.pt")], "(an empty file)"))
    for args, words in cases:
        assert main(["generate", "--max-tokens", "20", *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and words in captured.err, (args, captured.err)
        assert "Traceback" not in captured.err
    assert not (tmp_path / "t.mid").exists()


@pytest.mark.parametrize("count", [300, 30])
def test_a_closed_pipe_ends_generate_quietly_after_writing_the_midi(random_model, tmp_path, count):
    """``rnnkern generate ... | head -1``: the MIDI file is written first, and the closed pipe
    ends the command with the shell's SIGPIPE status, no traceback, whether the pipe closes
    while tunes are written (300: more than a pipe's 64 KB buffer) or at the final flush of
    block-buffered output (30)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, path = random_model
    midi = tmp_path / "t.mid"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # (as in a plain shell: stdout to a pipe is buffered)
    cmd = [sys.executable, "-m", "rnnkern.cli", "generate", "--model", str(path), "--count",
           str(count), "--max-tokens", "200", "--midi", str(midi)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and midi.is_file(), err


def test_ctrl_c_ends_the_command_by_sigint_and_returns_130_in_process(
    random_model, capsys, monkeypatch
):
    """Python ends a process on an uncaught Ctrl-C by SIGINT, so that a shell loop around it
    stops too; the command does the same after its one-line message, and returns 130 when
    called in process."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    _, path = random_model
    code = (
        "import sys, rnnkern.cli as cli, rnnkern.music.generate as g\n"
        "def interrupted(args): raise KeyboardInterrupt\n"
        "g.run_generate = interrupted\n"
        "sys.exit(cli.main())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert "rnnkern: interrupted" in proc.stderr and "Traceback" not in proc.stderr

    import rnnkern.music.generate as generate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run_generate", interrupted)
    assert main(["generate", "--model", str(path)]) == 130
    assert "rnnkern: interrupted" in capsys.readouterr().err


def test_generate_names_a_non_finite_model(random_model, tmp_path, capsys):
    model, _ = random_model
    broken = tmp_path / "nan.pt"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"].fill_(float("nan"))
    save_checkpoint(broken, {
        "format": CHECKPOINT_FORMAT, "kind": "abc", "tokens": list(abc.VOCABULARY),
        "model_config": model.config.to_dict(), "train_config": {}, "model": state,
        "history": {"val_loss": []},
    })  # fmt: skip
    assert main(["generate", "--model", str(broken), "--max-tokens", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkern generate:") and "NaN" in err, err


def test_a_count_that_does_not_fit_in_memory_names_count(
    random_model, capsys, huge_allocations_fail
):
    _, path = random_model
    assert main(["generate", "--model", str(path), "--count", str(10**12)]) == 2
    assert "--count 1000000000000: the decoder's state" in capsys.readouterr().err
