"""Faults injected at random points of a short `raybooth train`: the process killed outright
(SIGKILL: no clean-up runs), killed in the middle of writing a checkpoint, a Ray Train worker
killed, and the signals a scheduler or a terminal sends (SIGTERM, SIGINT). After each, the same
command run again ends with the weights and losses of an uninterrupted run, resumed from a whole
checkpoint, and no output is ever half-written.

The moments come from a seeded generator: RAYBOOTH_FAULT_SEED picks another set, and
RAYBOOTH_FAULT_ROUNDS runs more rounds of each kind (bench/faults.sh runs many, for the figure in
docs/troubleshooting.md)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from helpers import train_args, write_solid_images
from safetensors.torch import load_file

from raybooth.files.checkpoints import is_complete

STEPS, EVERY = 30, 6  # a checkpoint every 6 steps of 30
ROUNDS = int(os.environ.get("RAYBOOTH_FAULT_ROUNDS", "1"))
CHOOSE = random.Random(int(os.environ.get("RAYBOOTH_FAULT_SEED", "0")))
KINDS = ("kill", "kill while writing a checkpoint", "kill a worker", "SIGTERM", "SIGINT")
# Each round: the kind, and the step after which it strikes (past the first checkpoint, before the last step).
FAULTS = [(kind, CHOOSE.randrange(EVERY + 1, STEPS - 1)) for _ in range(ROUNDS) for kind in KINDS]


@pytest.fixture(scope="module")
def setting(tiny_model_dir, subject_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    class_dir = write_solid_images(folder / "class", (0, 0, 200), 4)[0].parent

    def args(output, *extra):
        return train_args(tiny_model_dir, folder / output, subject_dir, class_dir, "--max_train_steps", str(STEPS),
                          "--num_epochs", "1000", "--checkpointing_steps", str(EVERY), "--no_use_gpu", *extra)

    reference = run(args("reference"), folder / "reference.log")
    assert reference.returncode == 0, reference.stderr
    return folder, args


def run(args, log_path, strike=None):
    """`raybooth train`; `strike(process, log)` is called with each new line of its log."""
    with open(log_path, "w+") as log:
        # A shell without job control starts background jobs with SIGINT ignored: give it Python's Ctrl-C.
        process = subprocess.Popen([sys.executable, "-m", "raybooth", *args], stderr=log, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen, deadline = 0, time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            log.seek(0)
            lines = log.read().splitlines()
            for line in lines[seen:]:
                if strike is not None and strike(process, line):
                    strike = None
            seen = len(lines)
            time.sleep(0.05)
        process.wait(timeout=max(1, deadline - time.monotonic()))
        log.seek(0)
        process.stderr = log.read()
    return process


def striker(kind: str, after_step: int):
    """What to do, on which line of the log: a step's progress line past `after_step`, or, for a
    kill while writing, the next checkpoint's copy line (its write is then under way)."""
    def strike(process, line) -> bool:
        step = re.search(r"step (\d+)/", line)
        if kind == "kill while writing a checkpoint":
            due = "state copied" in line and int(re.search(r"step (\d+)", line).group(1)) > EVERY
        else:
            due = step is not None and int(step.group(1)) >= after_step
        if not due:
            return False
        if kind == "kill a worker":
            workers = [p for p in psutil.Process(process.pid).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            workers[0].kill()
        elif kind in ("SIGTERM", "SIGINT"):
            process.send_signal(getattr(signal, kind))
        else:  # the whole command, at once: nothing of its own clean-up runs
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
        return True
    return strike


def trained(folder):
    return {part: load_file(folder / part / name) for part, name in
            (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))}


@pytest.mark.parametrize("kind, after_step", FAULTS, ids=[f"{kind}@{step}" for kind, step in FAULTS])
def test_after_a_fault_the_same_command_ends_as_an_uninterrupted_run(setting, kind, after_step):
    folder, args = setting
    name = f"{kind.replace(' ', '-')}-{after_step}"
    extra = ("--max_failures", "1") if kind == "kill a worker" else ()
    faulted = run(args(name, *extra), folder / f"{name}.log", striker(kind, after_step))
    expected = {"SIGTERM": 143, "SIGINT": 130, "kill a worker": 0}.get(kind, -signal.SIGKILL)
    assert faulted.returncode == expected, faulted.stderr
    if kind != "kill a worker":  # else Ray Train restarted the worker and the run finished
        assert not (folder / name).exists()  # nothing half-written where the output goes
        storage = folder / "ray-storage"
        checkpoints = [c for c in storage.glob("raybooth-*/step-*") if c.is_dir()]
        assert any(is_complete(c) for c in checkpoints), faulted.stderr  # a whole checkpoint to resume from
        again = run(args(name, *extra), folder / f"{name}-again.log")
        assert again.returncode == 0, again.stderr
        assert "resum" in again.stderr
    reference, resumed = trained(folder / "reference"), trained(folder / name)
    assert all(torch.equal(reference[part][key], resumed[part][key]) for part in reference for key in reference[part])
    history = json.loads((folder / name / "training_log.json").read_text())["history"]
    reference_history = json.loads((folder / "reference" / "training_log.json").read_text())["history"]
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))  # none repeated, none skipped
    assert [row["loss"] for row in history] == [row["loss"] for row in reference_history]
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}")]  # no partial folder, no lock left
