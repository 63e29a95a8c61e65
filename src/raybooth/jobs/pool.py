"""Subjects scheduled over the cluster by Ray: a pool of actors (jobs/subject.py's SubjectRunner),
each with its share of a GPU (or CPUs), each training subject after subject as the one before
finishes. Actors rather than Ray Tune trials: a trial is a process per subject, and Ray refuses Ray
Train's local mode inside a Tune trial, so each subject would start Ray Train worker processes too
(11-16 s each on an H100, bench/RESULTS.md); an actor keeps one process, its imports and its page
cache for all its subjects, and runs each in local mode. Ray places the actors (any node, any GPU);
a subject that fails, or whose actor dies, fails alone, and a fresh actor takes the next."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from raybooth.driver.cluster import cluster_resource, cpus_per_worker
from raybooth.errors import RayboothError, first_line
from raybooth.jobs.run import RunPlan
from raybooth.jobs.subject import SubjectRunner
from raybooth.terminal.log import log


@dataclass
class Slots:
    """How many subjects train at once, and what each one's actor holds."""

    count: int
    cpus: float
    gpus: float  # 0 on CPU; a share of one GPU where several subjects share it

    @classmethod
    def on_cluster(cls, use_gpu: bool, subjects_per_gpu: int, at_once: int | None) -> Slots:
        """On GPUs, `subjects_per_gpu` on each (one CPU each); on CPUs one subject, or `at_once`,
        sharing all CPUs but one (Ray Data's, as for training workers)."""
        if use_gpu:
            gpus = int(cluster_resource("GPU"))
            count = at_once or gpus * subjects_per_gpu
            return cls(count, cpus_per_worker(count, True), 1.0 / subjects_per_gpu)
        count = at_once or 1
        return cls(count, cpus_per_worker(count, False), 0.0)


def run_subjects(plans: dict[str, RunPlan], slots: Slots, done: Callable[[str, dict], None],
                 started: Callable[[str], None]) -> None:
    """Train every subject of `plans` on `slots.count` actors at most; `started(name)` as each
    begins, `done(name, result)` as each ends (result: SubjectRunner.run's). Ctrl-C stops them all."""
    import ray

    runner = ray.remote(SubjectRunner).options(num_cpus=slots.cpus, num_gpus=slots.gpus, max_restarts=0)
    waiting = list(plans)
    running: dict = {}  # object ref: (name, actor)
    idle: list = []

    def start_next() -> None:
        name = waiting.pop(0)
        actor = idle.pop() if idle else runner.remote()
        running[actor.run.remote(plans[name])] = (name, actor)
        started(name)

    try:
        while waiting or running:
            while waiting and len(running) < slots.count:
                start_next()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)  # a timed wait: Ctrl-C gets through
            for ref in ready:
                name, actor = running.pop(ref)
                try:
                    result = ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayActorError as error:  # killed (out of host memory) or crashed
                    result = {"status": "failed", "error": f"its process died: {first_line(error)}"}
                except ray.exceptions.RayError as error:
                    result = {"status": "failed", "error": first_line(error)}
                    ray.kill(actor)
                done(name, result)
    except KeyboardInterrupt:
        for _, actor in running.values():
            ray.kill(actor)
        raise
    finally:
        for actor in idle:
            ray.kill(actor)


class Progress:
    """One line per subject started and finished, with the batch's progress and its time left
    (the wall time per subject finished so far, the slots working at once included)."""

    def __init__(self, total: int, noun: str = "subject"):
        self.total, self.noun, self.finished, self.began = total, noun, 0, time.monotonic()

    def started(self, name: str) -> None:
        log(f"{self.noun} {name}: started")

    def ended(self, name: str, result: dict) -> None:
        self.finished += 1
        left = self.total - self.finished
        per_subject = (time.monotonic() - self.began) / self.finished
        eta = f", about {format_seconds(per_subject * left)} left" if left else ""
        if result["status"] == "done":
            what = f"done in {format_seconds(result.get('seconds', 0))}, {result['steps']} steps"
            if result.get("final_loss") is not None:
                what += f", final loss {result['final_loss']:.4f}"
        else:
            what = f"failed: {result['error']}"
        log(f"{self.noun} {name}: {what} [{self.finished}/{self.total}{eta}]")


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def check_plans(plans: dict[str, RunPlan]) -> None:
    """Every subject runs in its actor's own process: one worker each."""
    for name, plan in plans.items():
        if plan.train.num_workers != 1 or plan.train.gpus_per_worker != 1:
            raise RayboothError(f"subject {name!r}: a batch trains each subject on one worker of one GPU (its "
                                "subjects spread over the GPUs instead); drop num_workers and gpus_per_worker")
