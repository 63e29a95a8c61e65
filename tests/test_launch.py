"""Handing the loop to Ray Train: which runs stay in the command's process (local mode), and
how a loop there ends on Ctrl-C or on a failure."""

import _thread
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import config, train_briefly, write_solid_images

from raybooth.driver.launch import fit_interruptibly, fit_locally
from raybooth.driver.preload import preload
from raybooth.driver.runs import RunFolder
from raybooth.errors import RayboothError
from raybooth.train.losslog import LossLog
from raybooth.train.preload import local_devices, preloaded_models


@pytest.fixture
def steps_here(monkeypatch) -> list[int]:
    """The training steps taken in this process. A Ray Train worker process imports the loop
    afresh, without this spy: its steps are not counted."""
    steps, add = [], LossLog.add

    def counted(self, step, *rest):
        steps.append(step)
        return add(self, step, *rest)

    monkeypatch.setattr(LossLog, "add", counted)
    return steps


def test_one_worker_on_a_ray_this_command_started_trains_in_its_process(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys, steps_here):
    code, log, record = train_briefly(tiny_model_dir, subject_dir, tmp_path, capsys)
    assert code == 0, log
    assert "1 worker(s) on CPU in this process (Ray Train local mode)" in log
    assert steps_here == [row["step"] for row in record["history"]] == [1, 2]


def test_restarts_of_a_lost_worker_need_a_worker_process(ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys,
                                                         steps_here):
    # (--no_local_mode and --num_workers 2 train in worker processes too: tests/test_trainer.py.)
    code, log, record = train_briefly(tiny_model_dir, subject_dir, tmp_path, capsys, "--max_failures", "1")
    assert code == 0, log
    assert "1 worker(s) on CPU\n" in log and "in this process" not in log
    assert [row["step"] for row in record["history"]] == [1, 2] and steps_here == []  # trained, but elsewhere


def test_local_mode_asked_for_with_an_option_that_needs_worker_processes_is_one_clear_error():
    with pytest.raises(RayboothError, match="--local_mode runs one worker in this process; it does not go with "
                                            "--num_workers above 1"):
        config(local_mode=True, num_workers=2).validate()


def test_local_mode_trains_on_the_devices_a_worker_would_get():
    assert local_devices(use_gpu=True, gpus_per_worker=2) == ["cuda:0", "cuda:1"]
    assert local_devices(use_gpu=False, gpus_per_worker=0) == ["cpu"]


class Trainer:
    """A stand-in for TorchTrainer whose fit() runs `loop` in the calling thread."""

    def __init__(self, loop):
        self.loop = loop

    def fit(self):
        return self.loop()


def test_ctrl_c_stops_a_loop_in_this_process_before_the_clean_up_begins():
    steps, stopped = [], threading.Event()

    def loop():
        try:
            while len(steps) < 3000:  # 30 s: long past the Ctrl-C
                steps.append(len(steps))
                time.sleep(0.01)
        finally:
            stopped.set()

    # Python's Ctrl-C handler, which a process started in the background (SIGINT ignored) lacks.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, _thread.interrupt_main).start()  # Ctrl-C, as the main thread receives it
        with pytest.raises(KeyboardInterrupt):
            fit_interruptibly(Trainer(loop), stop_on_interrupt=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(steps) < 3000  # stopped by the Ctrl-C, not by the loop's own end
    assert stopped.is_set() and steps  # ended, not left running beside the clean-up
    count = len(steps)
    time.sleep(0.1)
    assert len(steps) == count


def test_a_failure_in_local_mode_is_one_line_with_the_traceback_in_a_file(tmp_path):
    threads = torch.get_num_threads()
    seen = {}

    def loop():
        seen["threads"] = torch.get_num_threads()
        raise ValueError("cross_attention_dim must be a number\nmore detail")

    run = RunFolder(SimpleNamespace(storage_path=str(tmp_path), output_dir=tmp_path / "tuned"))
    with pytest.raises(RayboothError, match=r"^training failed: ValueError: cross_attention_dim must be a number "
                                            r"\(the full traceback is in .*\)$") as failure:
        fit_locally(Trainer(loop), cpus=1.0, run=run)
    assert seen["threads"] == 1  # as a Ray worker of one CPU has it
    assert torch.get_num_threads() == threads  # this process's own again
    log_file = Path(str(failure.value).rsplit("the full traceback is in ", 1)[1].rstrip(")"))
    assert "Traceback" in log_file.read_text() and "more detail" in log_file.read_text()


def test_the_models_load_before_ray_starts_where_the_run_will_be_in_local_mode(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))  # a command's start
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    no_images = ([], [], 64)
    assert preload(config(address="10.0.0.1:6379"), tiny_model_dir, *no_images) is None  # a cluster: workers
    assert preload(config(num_workers=2), tiny_model_dir, *no_images) is None
    assert preload(config(local_mode=False), tiny_model_dir, *no_images) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert preload(config(), tiny_model_dir, *no_images) is None
    monkeypatch.delenv("RAY_ADDRESS")

    on_cpu, elsewhere = (SimpleNamespace(local_devices=names) for names in (["cpu"], ["cuda:0"]))
    photos = write_solid_images(tmp_path / "photos", (255, 0, 0), 2, size=(96, 64))
    classes = write_solid_images(tmp_path / "class", (0, 0, 255), 3)
    loading = preload(config(use_gpu=False), tiny_model_dir, photos, [str(path) for path in classes], 32)
    models = preloaded_models(loading, on_cpu)
    assert models.unet.device.type == "cpu" and models.unet.dtype == torch.float32 and models.unet.training
    assert loading.models.loaded is None  # handed over: gone with the loop that takes them
    instance, by_path = loading.images.take()  # the images too, as Ray Data's tasks would read them
    assert list(instance) == [str(path) for path in photos] and list(by_path) == [str(path) for path in classes]
    assert instance[str(photos[0])].shape == (32, 48, 3) and by_path[str(classes[0])][0, 0].tolist() == [0, 0, 255]
    # Ray saw other devices: the worker loads anew.
    assert preloaded_models(preload(config(use_gpu=False), tiny_model_dir, *no_images), elsewhere) is None
    assert preloaded_models(None, on_cpu) is None
    with pytest.raises(RayboothError, match="does not exist"):  # a failed load fails where the worker takes the models
        preloaded_models(preload(config(use_gpu=False), tmp_path, *no_images), on_cpu)
