"""Checkpoints and resume: the state round-trips, the data stream continues where it stopped, and
a run that is interrupted, or loses a worker, ends with what an uninterrupted run writes."""

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import fp32_models, train_args, train_config, write_solid_images
from safetensors.torch import load_file

from raybooth.files.checkpoints import fingerprint, latest_checkpoint, read_state
from raybooth.models.loading import load_for_training
from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.checkpoints import restore, write_checkpoint
from raybooth.train.optim import make_optimizer

CPU = torch.device("cpu")


def training_set(seed=3) -> TrainingSet:
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (80, 72, 3), dtype=np.uint8) for _ in range(3)]
    classes = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    return TrainingSet(photos, classes, 64, pairing(3, 5, 5, 0, 1), 2, np.zeros(77, np.int64), np.ones(77, np.int64),
                       CPU, seed)


def test_batches_resumed_from_a_position_continue_the_uninterrupted_stream():
    whole = [(step, epoch, batch.pixels) for step, epoch, batch in training_set().batches(4, 10)]
    first = training_set()
    for step, _, _ in first.batches(4, 10):
        if step == 4:  # mid-epoch: 3 batches an epoch
            position = json.loads(json.dumps(first.position()))  # as a checkpoint stores it
            break
    resumed = [(step, epoch, batch.pixels) for step, epoch, batch in training_set(seed=99).batches(4, 10, 4, position)]
    assert [(s, e) for s, e, _ in resumed] == [(s, e) for s, e, _ in whole[4:]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(resumed, whole[4:]))


def test_a_checkpoint_fits_only_the_lora_settings_it_was_trained_with():
    settings = [fingerprint(train_config(*flags), 512) for flags in
                ([], ["--use_lora"], ["--use_lora", "--lora_rank", "8"], ["--use_lora", "--lora_alpha", "8"],
                 ["--use_lora", "--no_lora_text_encoder"])]
    assert all(a != b for i, a in enumerate(settings) for b in settings[i + 1:])
    assert fingerprint(train_config("--use_lora"), 512) == fingerprint(train_config("--use_lora", "--lora_rank", "4"), 512)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_checkpoint_restores_weights_optimizer_and_random_state(family, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_xl_dir" if family == "sdxl" else "tiny_model_dir")

    def setup():
        models = load_for_training(model_dir, CPU, CPU, torch.float32, True)
        return models, make_optimizer(models.trainable_parameters(), 1e-3)

    models, optimizer = setup()
    for parameter in models.trainable_parameters():  # a step, so the optimizer has state
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    torch.manual_seed(7)
    write_checkpoint(tmp_path, 0, models, optimizer, 12, [{"step": 12, "loss": 0.5}], {"next": 3},
                     {"num_workers": 1})
    expected_noise = torch.randn(4)

    fresh, fresh_optimizer = setup()
    step, history, position = restore(tmp_path, 0, fresh, fresh_optimizer)
    assert (step, history, position) == (12, [{"step": 12, "loss": 0.5}], {"next": 3})
    assert torch.equal(torch.randn(4), expected_noise)
    for a, b in zip(models.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a, b)
    state, fresh_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], fresh_state[k]["exp_avg"]) for k in state)
    # Every trained module is in it: SDXL's second text encoder too.
    parts = {name.split(".")[0] for name in load_file(tmp_path / "trained.safetensors")}
    assert parts == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"})
    assert latest_checkpoint(tmp_path.parent) is None  # not named as a checkpoint of a run
    (tmp_path / "optimizer.pt").unlink()
    assert read_state(tmp_path)["step"] == 12


def test_a_checkpoint_resumes_into_the_other_memory_layout(tiny_model_dir, tmp_path):
    # --channels_last is no setting a checkpoint must match: the moments of a contiguous run's
    # checkpoint take the channels-last UNet's layout on resume, and the other way round.
    def setup(channels_last):
        models = fp32_models(tiny_model_dir, channels_last)
        return models, make_optimizer(models.trainable_parameters(), 1e-3)

    for written_in_channels_last in (False, True):
        models, optimizer = setup(written_in_channels_last)
        for parameter in models.trainable_parameters():
            parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        write_checkpoint(tmp_path, 0, models, optimizer, 1, [], {}, {})
        fresh, fresh_optimizer = setup(not written_in_channels_last)
        restore(tmp_path, 0, fresh, fresh_optimizer)
        convs = [p for p in fresh.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # 1x1: either layout
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) != written_in_channels_last
                             for p in convs)
        for before, parameter in zip(models.trainable_parameters(), fresh.trainable_parameters()):
            assert torch.equal(before, parameter)
            for key in ("exp_avg", "exp_avg_sq"):
                moment = fresh_optimizer.state[parameter][key]
                assert moment.stride() == parameter.stride()
                assert torch.equal(moment, optimizer.state[before][key])


def start(args, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w+")
    # A shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that: give the command Python's Ctrl-C, as a terminal would.
    return subprocess.Popen([sys.executable, "-m", "raybooth", *args], stderr=log, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)), log


def wait_for(log, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        if text in log.read():
            return
        time.sleep(0.2)
    log.seek(0)
    raise AssertionError(f"{text!r} never came:\n{log.read()}")


def finish(run, log) -> str:
    run.wait(timeout=300)
    log.seek(0)
    return log.read()


@pytest.fixture
def runs(tiny_model_dir, subject_dir, tmp_path):
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent

    def args(output, *extra, steps=60):
        return train_args(tiny_model_dir, tmp_path / output, subject_dir, class_dir, "--max_train_steps", str(steps),
                          "--num_epochs", "1000", "--checkpointing_steps", "6", "--no_use_gpu", *extra)
    return args


def assert_same_training(tmp_path, resumed: str, reference: str) -> None:
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(tmp_path / resumed / part / name), load_file(tmp_path / reference / part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    history = json.loads((tmp_path / resumed / "training_log.json").read_text())["history"]
    reference_history = json.loads((tmp_path / reference / "training_log.json").read_text())["history"]
    assert [row["step"] for row in history] == list(range(1, 61))  # none repeated, none skipped
    assert [row["loss"] for row in history] == [row["loss"] for row in reference_history]


def test_interrupted_then_run_again_it_resumes_and_ends_as_an_uninterrupted_run(runs, tmp_path):
    reference, log = start(runs("reference"), tmp_path, "reference")
    assert finish(reference, log) and reference.returncode == 0

    first, log = start(runs("tuned"), tmp_path, "first")
    wait_for(log, "checkpoint at step 12 written")
    first.send_signal(signal.SIGINT)
    output = finish(first, log)
    assert first.returncode == 130, output
    assert "re-run the same command to resume from it" in output and not (tmp_path / "tuned").exists()

    again, log = start(runs("tuned"), tmp_path, "again")
    output = finish(again, log)
    assert again.returncode == 0, output
    assert "resumed at step" in output and "resuming from it" in output
    assert_same_training(tmp_path, "tuned", "reference")
    assert not list((tmp_path / "ray-storage").glob("raybooth-*"))  # the finished run leaves nothing behind


def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(runs, tmp_path):
    run, log = start(runs("tuned", "--max_failures", "1"), tmp_path, "killed")
    wait_for(log, "checkpoint at step 12 written")
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "no Ray Train worker process found"
    workers[0].kill()
    output = finish(run, log)
    assert run.returncode == 0, output
    assert "resumed at step" in output
    history = json.loads((tmp_path / "tuned" / "training_log.json").read_text())["history"]
    assert [row["step"] for row in history] == list(range(1, 61))


def test_a_named_checkpoint_is_resumed_and_one_of_other_settings_is_refused(runs, tmp_path, capsys):
    from raybooth.commands.cli import main

    run, log = start(runs("tuned"), tmp_path, "first")
    wait_for(log, "checkpoint at step 6 written")
    run.send_signal(signal.SIGINT)
    finish(run, log)
    checkpoint = latest_checkpoint(next((tmp_path / "ray-storage").glob("raybooth-*")))
    assert main(runs("tuned", "--seed", "5")) == 1
    assert ("comes from a run with other settings (--seed 0 -> 5), which a resumed run cannot change; use the "
            "checkpoint's, or pass --resume_from_checkpoint none" in capsys.readouterr().err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # found before any output was begun

    # Into another output, from that checkpoint by its path.
    run, log = start(runs("other", "--resume_from_checkpoint", str(checkpoint)), tmp_path, "from-path")
    output = finish(run, log)
    assert run.returncode == 0, output
    step = read_state(checkpoint)["step"]
    assert f"resuming from the checkpoint at step {step} in {checkpoint}" in output
    history = json.loads((tmp_path / "other" / "training_log.json").read_text())["history"]
    assert [row["step"] for row in history] == list(range(1, 61))


@pytest.mark.parametrize("mode, told", [("--local_mode", "training failed: "),
                                         ("--no_local_mode", "training failed on a worker: ")])
def test_a_worker_failure_is_one_line_and_its_traceback_goes_to_a_log_file(model_copy, subject_dir, tmp_path,
                                                                           capsys, mode, told):
    from raybooth.commands.cli import main

    config = json.loads((model_copy / "unet" / "config.json").read_text())
    (model_copy / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": "wide"}))
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
    assert main(train_args(model_copy, tmp_path / "tuned", subject_dir, class_dir, "--no_use_gpu", mode)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"raybooth: error: {told}"), error
    log_file = Path(error.rsplit("the full traceback is in ", 1)[1].rstrip(")"))
    assert "Traceback" in log_file.read_text() and "cross_attention_dim" in log_file.read_text()


def test_losing_a_node_mid_run_the_run_recovers_on_the_others_and_finishes(runs, tmp_path, monkeypatch):
    """Two Ray nodes on this machine, a worker on each; the second node stops after a checkpoint."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{node_ip()}:{port}"  # this machine's own address: Ray turns 127.0.0.1 into it
    ray = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats"]
    # A cluster made by `ray start` asks clients for a token by default; this one is local and brief.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    started = [subprocess.Popen(ray + ["--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(8)  # the head's GCS must be up before a node joins
        started.append(subprocess.Popen(ray + [f"--address={address}", "--num-cpus=1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        run, log = start(runs("tuned", "--address", address, "--num_workers", "2", "--max_failures", "1",
                              "--placement_strategy", "SPREAD", steps=400), tmp_path, "two-nodes")
        wait_for(log, "checkpoint at step 12 written")
        stop(started[1])  # the second node, and the worker on it, go away
        output = finish(run, log)
        assert run.returncode == 0, output
        assert "resumed at step" in output, output
        history = json.loads((tmp_path / "tuned" / "training_log.json").read_text())["history"]
        assert [row["step"] for row in history] == list(range(1, 401))
    finally:
        for process in reversed(started):
            stop(process)


def node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def stop(process: subprocess.Popen) -> None:
    """A `ray start --block` process and every process it started, by PID, at once, as a node
    that is preempted goes."""
    if process.poll() is not None:
        return
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # one may end on its own meanwhile (seen in CI)
            child.kill()
    process.kill()
    process.wait()
