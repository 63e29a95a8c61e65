"""Handing the training loop to Ray Train: to worker processes, or, for one worker on the
machine the command runs on, to Ray Train's local mode, which runs the same loop in the
command's own process. A worker process costs 11-16 s on an H100 before the loop starts (Ray
Train's controller and worker actors, each a fresh process importing torch, and its process
group); local mode skips all of it (bench/RESULTS.md). What Ray Train's workers give besides,
restarts after a failure and checkpoints on remote storage, needs them
(TrainConfig.local_mode_blocker). How a command stops is here too: Ctrl-C, and the signals
that stop it as Ctrl-C does; writes left going as it ends. This module imports no torch until called."""

from __future__ import annotations

import ctypes
import gc
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from raybooth.driver.cluster import cpus_per_worker
from raybooth.driver.runs import RunFolder
from raybooth.errors import RayboothError

if TYPE_CHECKING:
    from raybooth.train.plan import TrainPlan
from raybooth.train.preload import Preloaded


def fit(plan: TrainPlan, train_datasets: dict, run: RunFolder, preloaded: Preloaded | None = None):
    """Run the plan's loop on Ray Train's workers (or, in local mode, in this process); its result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raybooth.train.loop import train_worker

    cfg, local, use_gpu = plan.config, plan.local, plan.use_gpu
    cpus = cpus_per_worker(cfg.num_workers, use_gpu)
    resources = {"CPU": cpus, **({"GPU": plan.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan, **({"preloaded": preloaded} if local and preloaded else {})},
        scaling_config=ray.train.ScalingConfig(num_workers=0) if local else ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=run.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_total_limit),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=train_datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    if local:
        return fit_locally(trainer, None if use_gpu else cpus, run)
    try:
        return fit_interruptibly(trainer)
    except ray.train.TrainingFailedError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        ours = [line.split("RayboothError: ", 1)[1] for line in lines if "RayboothError: " in line]
        if ours:  # a problem the worker could name
            raise RayboothError(ours[-1]) from None
        log_file = run.write_error_log(str(error))
        raise RayboothError(f"training failed on a worker: {lines[-1] if lines else error!r} "
                            f"(the full traceback is in {log_file})") from None


@contextmanager
def as_a_worker(cpus: float | None) -> Iterator[None]:
    """Work that a Ray worker would do, done in this process (local mode's training, local
    generation). On CPUs torch takes the threads a worker of `cpus` CPUs would have (Ray sizes a
    worker's thread pool to its CPUs, and one CPU stays free for Ray Data), so it computes as a
    worker would. Afterwards the threads are this process's own again, and the GPU memory that the
    work's models held goes: later steps of the command (`raybooth run`'s) may need the GPU."""
    import torch

    threads = torch.get_num_threads()
    if cpus is not None:
        torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def fit_locally(trainer, cpus: float | None, run: RunFolder):
    """Ray Train's local mode, as a worker of `cpus` CPUs (None: on GPUs) would run the loop."""
    with as_a_worker(cpus):
        try:
            return fit_interruptibly(trainer, stop_on_interrupt=True)
        except (RayboothError, KeyboardInterrupt):
            raise
        except Exception as error:  # as a worker's failure is told: one line, the traceback in a file
            log_file = run.write_error_log(traceback.format_exc())
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise RayboothError(f"training failed: {type(error).__name__}: {first_line} "
                                f"(the full traceback is in {log_file})") from None


def fit_interruptibly(trainer, stop_on_interrupt: bool = False):
    """`trainer.fit()` on a thread of its own. On the main thread Ray Train installs a SIGINT
    handler that ends the process with exit 1 and no word; this way Ctrl-C reaches the CLI, which
    says so and exits 130, and the partial output is removed. Ray stops the workers on exit; a
    loop in this process (`stop_on_interrupt`, local mode) is stopped before the clean-up."""
    outcome: dict = {}
    done = threading.Event()  # not Thread.join: once Ctrl-C has cut a join short, a later one returns at once

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error
        finally:
            done.set()

    thread = threading.Thread(target=fit, name="raybooth-fit", daemon=True)
    thread.start()
    try:
        while not done.wait(0.5):  # a timed wait, so that KeyboardInterrupt is raised here
            pass
    except KeyboardInterrupt:
        if stop_on_interrupt:
            interrupt(thread, done)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def interrupt(thread: threading.Thread, done: threading.Event, timeout_s: float = 60.0) -> None:
    """Raise KeyboardInterrupt in `thread`, as Ctrl-C does in the main thread, and wait until it
    is `done`. It is raised at the thread's next Python instruction: work queued on a GPU finishes first."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    done.wait(timeout_s)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C's KeyboardInterrupt is, so that Ctrl-C's clean-up runs."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # schedulers' stop (Slurm, Kubernetes, systemd, docker); terminal closed


def stop_as_by_ctrl_c() -> dict:
    """Have STOP_SIGNALS stop the command as Ctrl-C does (no signal left ignored, as nohup leaves
    SIGHUP, and only on the main thread). Ray's own SIGTERM handler would exit at once, the
    training thread aborting inside Ray's C++ (driver/cluster.py puts this one back). A repeat is
    ignored: it must not cut the clean-up short. Returns the handlers to restore, and the signal."""
    state: dict = {"signal": None, "before": {}}
    if threading.current_thread() is not threading.main_thread():
        return state

    def stop(signum, frame):
        state["signal"] = signum
        for number in state["before"]:
            signal.signal(number, signal.SIG_IGN)
        raise Stopped(signum)

    for number in STOP_SIGNALS:
        if signal.getsignal(number) == signal.SIG_DFL:
            state["before"][number] = signal.signal(number, stop)
    return state


# raybooth's daemon threads that write (train/checkpoint_writer.py's), and what each writes
WRITER_THREADS = {"raybooth-checkpoint": "a checkpoint"}
WRITES_WAIT_S = 600.0  # at most, for writes still going when the command ends


def finish_writes() -> None:
    """Wait for raybooth's writer threads (daemons: Python's exit would not), up to WRITES_WAIT_S;
    one line says what was lost where one does not finish."""
    timeout_s = WRITES_WAIT_S
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        what = WRITER_THREADS.get(thread.name) if thread.daemon else None
        if what is None:
            continue
        thread.join(min(2.0, timeout_s))
        if thread.is_alive():
            print(f"raybooth: waiting for {what} being written (up to {timeout_s:g} s)", file=sys.stderr)
            thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            print(f"raybooth: {what} being written did not finish in {timeout_s:g} s: it is lost", file=sys.stderr)
