"""Training: loss falls, exact resume, atomic checkpoints, loss curve, DDP with 2 CPU processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkern.music import abc
from rnnkern.music.train import Dataset, TrainConfig, load_checkpoint, train

pytest.importorskip("matplotlib", reason="the loss curve needs the music extra")

TUNES = [
    "X:1\nM:6/8\nL:1/8\nK:D\nA|dfa agf|gfe d2A|dfa agf|e3 d2:|\n",
    "X:2\nM:4/4\nL:1/8\nK:G\nGABc d2B2|c2A2 B2G2|GABc d2g2|f2a2 g4|]\n",
    "X:3\nM:3/4\nL:1/8\nK:Ador\nA2 c2 e2|a4 g2|e2 d2 c2|B6|A2 c2 e2|g4 e2|d2 B2 G2|A6|]\n",
    "X:4\nM:2/4\nL:1/16\nK:Em\nE2G2 B2e2|d2B2 A2F2|E2G2 B2e2|f2d2 e4:|\n",
]
SMALL_MODEL = {"embedding_dim": 16, "hidden_size": 32, "num_layers": 2, "dropout": 0.2}
ROOT = Path(__file__).resolve().parents[1]


def tiny_dataset(copies: int = 8) -> Dataset:
    seqs = [abc.encode(abc.tokenize(t)) for t in TUNES] * copies
    return Dataset("abc", list(abc.VOCABULARY), seqs, "test tunes")


def config(**kw) -> TrainConfig:
    base = dict(data=["test"], epochs=3, batch_size=4, window=24, lr=1e-2, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_msg: str) -> None:
    pass


def _cli_run(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A folder of tunes, a run folder and the environment for ``rnnkern.cli train`` in a
    subprocess (one thread a process, this checkout's rnnkern)."""
    folder = tmp_path / "tunes"
    folder.mkdir()
    (folder / "set.abc").write_text("\n".join(TUNES * 3))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return folder, tmp_path / "run", env


def test_training_loss_falls(tmp_path):
    state = train(config(epochs=4), SMALL_MODEL, tmp_path, dataset=tiny_dataset(), log=quiet,
                  progress=False)  # fmt: skip
    losses = state["history"]["train_loss"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(137) = 4.9 towards the tunes' entropy
    val = state["history"]["val_loss"]
    assert len(val) == 4 and val[-1] < val[0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "history.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    # On the CPU, bit for bit. Not on a GPU: there the embedding's backward accumulates with
    # atomics, so even two uninterrupted runs differ in the last bits (seen on an H100:
    # embedding.weight differed after a resume), unless torch.use_deterministic_algorithms is on.
    data = tiny_dataset()
    kw = dict(dataset=data, log=quiet, progress=False, device="cpu")
    full = train(config(), SMALL_MODEL, tmp_path / "full", **kw)
    # Stop mid-epoch (step 7 of 14 per epoch), then resume from the checkpoint in a fresh call.
    train(config(max_steps=7), SMALL_MODEL, tmp_path / "cut", **kw)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut["global_step"] == 7 and cut["epoch"] == 0
    torch.manual_seed(1234)  # resume must not depend on the caller's RNG
    resumed = train(config(), SMALL_MODEL, tmp_path / "cut", **kw)
    assert resumed["global_step"] == full["global_step"]
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]


def test_resume_with_another_configuration_is_an_error(tmp_path):
    data = tiny_dataset(2)
    train(config(max_steps=2), SMALL_MODEL, tmp_path, dataset=data, log=quiet, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(config(lr=0.5), SMALL_MODEL, tmp_path, dataset=data, log=quiet, progress=False)


def test_resume_refuses_other_model_settings_and_changed_data(tmp_path):
    """The model's settings are part of the run as much as the training's: a resume given
    others is refused, naming them (it had trained the saved model silently). So is data that
    changed since the checkpoint (its batches and validation split would differ)."""
    data = tiny_dataset(2)
    kw = dict(log=quiet, progress=False)
    train(config(max_steps=2), SMALL_MODEL, tmp_path, dataset=data, **kw)
    bigger = {**SMALL_MODEL, "hidden_size": 64, "cell": "gru"}
    with pytest.raises(ValueError, match=r"cell: saved 'lstm', given 'gru'; hidden_size: saved "
                       r"32, given 64\)"):  # fmt: skip
        train(config(max_steps=4), bigger, tmp_path, dataset=data, **kw)
    with pytest.raises(ValueError, match=r"lr: saved 0.01, given 0.5\)"):
        train(config(lr=0.5), SMALL_MODEL, tmp_path, dataset=data, **kw)
    more = Dataset(data.kind, data.tokens, data.sequences + data.sequences[:1], data.report)
    with pytest.raises(ValueError, match="trained on other data"):
        train(config(max_steps=4), SMALL_MODEL, tmp_path, dataset=more, **kw)
    state = train(config(max_steps=4), SMALL_MODEL, tmp_path, dataset=data, **kw)
    assert state["global_step"] == 4


def test_running_a_finished_run_again_takes_no_step(tmp_path):
    data = tiny_dataset(2)
    kw = dict(dataset=data, log=quiet, progress=False)
    first = train(config(max_steps=3), SMALL_MODEL, tmp_path, **kw)
    again = train(config(max_steps=3), SMALL_MODEL, tmp_path, **kw)
    assert first["global_step"] == again["global_step"] == 3
    assert again["history"]["step"] == [1, 2, 3]


def test_stale_temporary_files_are_removed(tmp_path):
    """What a process killed outright while writing a checkpoint leaves (SIGKILL: nothing runs
    to clean up) goes at the next start; other files stay."""
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".checkpoint.pt.k3j2x9.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / "notes.txt"
    mine.write_text("keep")
    train(config(max_steps=1), SMALL_MODEL, tmp_path, dataset=tiny_dataset(2), log=quiet,
          progress=False)  # fmt: skip
    assert not stale.exists() and mine.read_text() == "keep"


@pytest.mark.host_only  # (a CPU process)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, sig):
    """Ctrl-C or SIGTERM during training: the run finishes its step, saves a checkpoint, says
    so and exits with 130, with no traceback; running the command again resumes from it (a
    traceback and up to --checkpoint-every steps of lost work before)."""
    folder, out, env = _cli_run(tmp_path)
    cmd = [
        sys.executable, "-m", "rnnkern.cli", "train", "--data", str(folder), "--out", str(out),
        "--epochs", "100000", "--batch-size", "2", "--hidden", "16", "--embedding", "8",
        "--window", "32", "--quiet", "--device", "cpu", "--checkpoint-every", "100000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        for line in proc.stdout:  # printed once the signal handlers are in place
            if "parameters;" in line:
                break
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "saved" in stderr and "run the same command again to resume" in stderr
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["global_step"] >= 0 and not list(out.glob(".*.tmp"))
    resumed = subprocess.run(
        [*cmd[:cmd.index("--epochs") + 1], "100000", *cmd[cmd.index("--epochs") + 2:],
         "--max-steps", str(state["global_step"] + 1)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'}" in resumed.stdout
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == state["global_step"] + 1


def test_bad_configuration_names_the_argument():
    with pytest.raises(ValueError, match="optimizer"):
        config(optimizer="sgd")
    with pytest.raises(ValueError, match="window"):
        config(window=1)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 0"):
        config(max_steps=-5)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        config(seed=2**64)


def test_every_seed_orders_the_epochs():
    """Seeds up to 2**64 - 1 are accepted, so each must give an epoch order (from about 9.2e12
    on, the derived generator seed overflowed)."""
    from rnnkern.music.train import epoch_batches

    for seed in (0, 10**14, 2**64 - 1):
        batches = epoch_batches(10, 4, seed, epoch=3)
        assert sorted(i for b in batches for i in b) == list(range(10))
    assert epoch_batches(10, 4, 5, 3) == epoch_batches(10, 4, 5, 3)


@pytest.mark.host_only  # (CPU processes)
def test_ddp_two_cpu_processes(tmp_path):
    """torchrun --nproc_per_node=2 trains with gloo; rank 0 writes the checkpoint."""
    folder, out, env = _cli_run(tmp_path)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "rnnkern.cli", "train", "--data", str(folder), "--out",
        str(out), "--epochs", "2", "--batch-size", "2", "--hidden", "16", "--embedding", "8",
        "--window", "32", "--val-fraction", "0.2", "--quiet", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    # 10 training tunes cut into 16 windows of <= 32 tokens, batches of 2 -> 8 batches,
    # split over 2 ranks -> 4 steps per epoch
    assert state["global_step"] == 8 and state["epoch"] == 2
    assert len(state["rng"]) == 2
    assert all(torch.isfinite(torch.tensor(state["history"]["val_loss"])))


def test_training_device_choice():
    from rnnkern.music.train import training_device

    assert training_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got 'gpu'"):
        training_device("gpu")
    if torch.cuda.is_available():
        assert training_device("auto") == torch.device("cuda", 0)
    else:
        assert training_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="device cuda asked for, but this process"):
            training_device("cuda")


def test_train_cli_refuses_negative_counts(capsys):
    from rnnkern.cli import main

    for flag in ("--threads", "--max-steps"):  # (a traceback, or one step, before)
        with pytest.raises(SystemExit) as info:
            main(["train", "--out", "unused", flag, "-1"])
        assert info.value.code == 2 and "expected an integer >= 0" in capsys.readouterr().err


def test_a_diverging_run_stops_without_saving_the_bad_step(tmp_path, monkeypatch):
    """A non-finite loss stops training with an error that says so; the checkpoint on disk
    stays the last one written before (finite weights), and no model.pt is written."""
    import math

    from rnnkern.music import train as train_mod

    real = train_mod.loss_on
    calls = []

    def loss_on(model, batch):
        loss, count = real(model, batch)
        calls.append(1)
        return (loss * math.nan if len(calls) == 7 else loss), count

    monkeypatch.setattr(train_mod, "loss_on", loss_on)
    with pytest.raises(train_mod.TrainingDiverged, match="diverged at step 7: the loss is nan"):
        train(config(checkpoint_every=3), SMALL_MODEL, tmp_path, dataset=tiny_dataset(),
              log=quiet, progress=False)  # fmt: skip
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_weights_that_stop_being_finite_are_never_saved(tmp_path):
    """An update can leave non-finite weights after a finite loss (an enormous learning
    rate): the next checkpoint refuses them, and the one on disk stays the last finite one."""
    from rnnkern.music.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="the weights are no longer finite"):
        train(config(lr=1e38, optimizer="rmsprop", checkpoint_every=1), SMALL_MODEL, tmp_path,
              dataset=tiny_dataset(), log=quiet, progress=False)  # fmt: skip
    if (tmp_path / "checkpoint.pt").exists():
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_no_validation_set_writes_strict_json(tmp_path):
    import json

    train(config(epochs=1, val_fraction=0.0), SMALL_MODEL, tmp_path, dataset=tiny_dataset(),
          log=quiet, progress=False)  # fmt: skip
    history = json.loads((tmp_path / "history.json").read_text(), parse_constant=pytest.fail)
    assert history["val_loss"] == [] and history["train_loss"]


def test_resume_names_what_is_wrong_with_the_checkpoint(tmp_path):
    from rnnkern.music.train import export_model

    train(config(epochs=1), SMALL_MODEL, tmp_path, dataset=tiny_dataset(), log=quiet,
          progress=False)  # fmt: skip
    ckpt = tmp_path / "checkpoint.pt"
    export_model(ckpt, ckpt)  # (weights only, as model.pt)
    with pytest.raises(ValueError, match="exported model .* not a training checkpoint"):
        train(config(epochs=2), SMALL_MODEL, tmp_path, dataset=tiny_dataset(), log=quiet)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a partial copy
    with pytest.raises(ValueError, match=r"cannot resume: .*truncated.*start afresh \(--no-resume"):
        train(config(epochs=2), SMALL_MODEL, tmp_path, dataset=tiny_dataset(), log=quiet)


def test_damaged_and_foreign_model_files_are_refused(tmp_path):
    from rnnkern.music.cli import DEFAULT_MODEL
    from rnnkern.music.train import save_checkpoint

    data = bytearray(DEFAULT_MODEL.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: torch.load took it
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged .* fails the archive's check"):
        load_checkpoint(damaged)
    if hasattr(torch.serialization, "set_crc32_options"):  # (no CRCs written: none checked)
        state = load_checkpoint(DEFAULT_MODEL)
        torch.serialization.set_crc32_options(False)
        try:
            save_checkpoint(tmp_path / "no_crc.pt", state)
        finally:
            torch.serialization.set_crc32_options(True)
        assert load_checkpoint(tmp_path / "no_crc.pt")["tokens"] == state["tokens"]
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(ValueError, match=r"not an rnnkern music model \(not a torch.save archive"):
        load_checkpoint(text)


def test_train_cli_checks_its_folder_and_numbers_before_any_work(tmp_path, capsys):
    from rnnkern.cli import main

    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    # (--data would take seconds to load: these fail before)
    assert main(["train", "--out", str(a_file / "run")]) == 2
    assert "a.txt is a file, not a folder" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--lr", "inf"]) == 2
    assert "lr and clip must be finite" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["train", "--out", "unused", "--epochs", "ten"])
    assert "--epochs: expected an integer >= 1, got 'ten'" in capsys.readouterr().err


def test_no_readable_data_says_so(tmp_path):
    from rnnkern.music.train import load_dataset

    folder = tmp_path / "midi"
    folder.mkdir()
    (folder / "fake.mid").write_text("not midi")
    dataset = load_dataset("performance", [str(folder)], log=quiet)
    with pytest.raises(ValueError, match="no training data: .* holds no readable MIDI file"):
        train(config(kind="performance"), SMALL_MODEL, tmp_path / "run", dataset=dataset,
              log=quiet)  # fmt: skip


def test_data_source_errors_say_what_was_meant():
    from rnnkern.music import performance

    with pytest.raises(ValueError, match="bach:N takes a count N >= 1, got 'abc'"):
        performance.load_sequences(["bach:abc"], performance.PerformanceTokenizer(), log=quiet)
    with pytest.raises(FileNotFoundError, match="'bach' is MIDI performance data: --kind perf"):
        abc.load_tunes(["bach"])


def test_train_cli_says_when_the_model_does_not_fit_in_memory(
    tmp_path, capsys, huge_allocations_fail
):
    from rnnkern.cli import main

    folder, out, _ = _cli_run(tmp_path)
    args = ["train", "--data", str(folder), "--out", str(out), "--hidden", "300000", "--quiet"]
    assert main(args) == 2  # (W_ih alone: 4 x 300000 x 64 floats; W_hh 1.4 TB)
    assert "out of memory" in capsys.readouterr().err
