"""What a resumed run does with the settings it is given: each of `raybooth train`'s settings
either belongs to the checkpoint's fingerprint (a resume under another value is refused, naming
the flag) or takes effect on resume and is logged as changed; a checkpoint torn by a kill is
skipped; a damaged one is refused in one line; a checkpoint loads as data, never code."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import train_args

import raybooth.train.loop
from raybooth.commands.cli import main
from raybooth.config import TrainConfig
from raybooth.files.checkpoints import (FINGERPRINT_FIELDS, OPTIMIZER, STATE, TAKES_EFFECT_ON_RESUME, TRAINED,
                                        is_complete, latest_checkpoint)
from raybooth.train.checkpoints import write_snapshot

FAST = ("--no_use_gpu", "--checkpointing_steps", "2", "--max_train_steps", "6", "--num_epochs", "100")


def test_every_setting_is_decided_one_way_or_the_other():
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    both = set(FINGERPRINT_FIELDS) & set(TAKES_EFFECT_ON_RESUME)
    undecided = set(fields) - set(FINGERPRINT_FIELDS) - set(TAKES_EFFECT_ON_RESUME)
    assert not both and not undecided, (both, undecided)


@pytest.fixture
def stopped_run(tiny_model_dir, subject_dir, tmp_path, monkeypatch):
    """A run that wrote its checkpoint at step 2 (and 4, 6 is its last step) and then failed while
    saving: its run folder keeps the checkpoints to resume from."""
    args = train_args(tiny_model_dir, tmp_path / "tuned", subject_dir, tmp_path / "class", *FAST)

    def fail(worker, metrics):
        worker.checkpoints.wait()
        raise RuntimeError("lost power while saving")

    with monkeypatch.context() as patch:
        patch.setattr(raybooth.train.loop, "save", fail)
        assert main(args) == 1
    run_folder = next((tmp_path / "ray-storage").glob("raybooth-*"))
    assert latest_checkpoint(run_folder).name == "step-0000004"
    return args, run_folder


def test_a_fingerprint_setting_changed_on_resume_is_refused_naming_the_flag(stopped_run, capsys):
    args, _ = stopped_run
    capsys.readouterr()
    assert main(args + ["--lr", "1e-3"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--lr 5e-06 -> 0.001" in error and "--resume_from_checkpoint none" in error


def test_a_setting_that_takes_effect_does_so_and_the_log_says_it_changed(stopped_run, tmp_path, capsys):
    args, run_folder = stopped_run
    # A kill in the middle of the next checkpoint's write: its state never appeared.
    torn = run_folder / "step-0000006"
    torn.mkdir()
    (torn / OPTIMIZER).write_bytes(b"half")
    capsys.readouterr()
    assert main(args + ["--max_train_steps", "9", "--prior_loss_weight", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "skipping the checkpoint step-0000006: its write was cut short" in err
    assert "resuming with changed settings, which take effect now" in err
    assert "--max_train_steps 6 -> 9" in err and "--prior_loss_weight 1.0 -> 0.5" in err
    log = json.loads((tmp_path / "tuned" / "training_log.json").read_text())
    assert [row["step"] for row in log["history"]] == list(range(1, 10))  # resumed at 4, ran to the new end
    assert log["config"]["prior_loss_weight"] == 0.5


def test_a_damaged_checkpoint_is_refused_in_one_line(stopped_run, capsys):
    args, run_folder = stopped_run
    checkpoint = latest_checkpoint(run_folder)
    (checkpoint / STATE).write_text('{"step": 4, "hist')
    capsys.readouterr()
    assert main(args + ["--resume_from_checkpoint", str(checkpoint)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not valid JSON" in error[0] and "damaged" in error[0]


def test_a_checkpoint_is_written_file_by_file_whole_or_not_at_all(tmp_path, monkeypatch):
    state = {"trained": {"w": torch.ones(4)}, "optimizer": {"state": {}}, "state": {"step": 1, "history": [],
             "settings": {"num_workers": 1}}, "random": {"torch": torch.get_rng_state(), "data": None, "cuda": None}}
    write_snapshot(tmp_path / "whole", 0, state)
    assert is_complete(tmp_path / "whole")
    # Every rank's random state loads as data alone (no pickled code allowed).
    assert torch.load(tmp_path / "whole" / "rng-0.pt", weights_only=True)["data"] is None

    real_save = torch.save

    def killed(value, path, *rest, **options):  # the process dies halfway through the optimizer's file
        real_save(value, path, *rest, **options)
        with open(path, "r+b") as file:
            file.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        write_snapshot(tmp_path / "torn", 0, state)
    assert (tmp_path / "torn" / TRAINED).is_file()
    assert not (tmp_path / "torn" / OPTIMIZER).exists() and not (tmp_path / "torn" / STATE).exists()
    assert not is_complete(tmp_path / "torn")


def test_a_checkpoint_cut_short_as_the_run_stops_is_said_to_be_lost(stopped_run, capsys):
    from types import SimpleNamespace

    from raybooth.driver.runs import RunFolder

    args, run_folder = stopped_run
    torn = run_folder / "step-0000006"  # a worker's upload that the stop cut short
    torn.mkdir()
    (torn / TRAINED).write_bytes(b"")
    run = RunFolder(SimpleNamespace(storage_path=str(run_folder.parent), output_dir=args[args.index("--output_dir") + 1]))
    capsys.readouterr()
    run.after_failure(interrupted=True)
    err = capsys.readouterr().err
    assert "the checkpoint step-0000006 was being written when the run stopped: it is lost" in err
    assert "interrupted after the checkpoint at step 4: re-run the same command to resume from it" in err
