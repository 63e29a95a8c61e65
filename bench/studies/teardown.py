"""Issue 5: how long a Ray Train run takes to end after its training function returns, with Ray
started as raybooth starts it, on one GPU worker: with Ray Train's default callbacks, and without
its placement-group cleaner (a detached actor that polls the state API, which needs Ray's
dashboard, and that the controller stops on shutdown, waiting for its poll). Then how long Ray's
own shutdown gives each of its processes, one after the other. Prints JSON lines.

    python bench/studies/teardown.py [RUNS]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from raybooth.driver.cluster import connect

MARK = Path(tempfile.gettempdir(), "raybooth-teardown-mark")


def loop(config: dict) -> None:

    ray.train.report({"step": 1})
    MARK.write_text(str(time.time()))  # the training function ends now


class WithoutCleaner(TorchTrainer):
    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if type(c).__name__ != "PlacementGroupCleanerCallback"]


def main(runs: int = 2) -> None:
    connect()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    scaling = ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": 1})
    for attempt in range(runs):
        for name, trainer_class in (("default callbacks", TorchTrainer), ("without the cleaner", WithoutCleaner)):
            started = time.time()
            trainer_class(loop, scaling_config=scaling).fit()
            ended = time.time()
            print(json.dumps({"variant": name, "attempt": attempt, "fit_s": round(ended - started, 2),
                              "after_loop_s": round(ended - float(MARK.read_text()), 2)}), flush=True)
    time_shutdown()


def time_shutdown() -> None:
    """ray.shutdown() at Ray's own pace, each process's stop timed (Ray's exit hook also sleeps
    0.5 s first); raybooth's exit hook kills the monitor before it."""
    node = ray._private.worker._global_node
    stop_one = node._kill_process_impl
    stopped = {}

    def timed(process_type, **options):
        started = time.time()
        stop_one(process_type, **options)
        stopped[process_type] = round(time.time() - started, 2)

    node._kill_process_impl = timed
    started = time.time()
    ray.shutdown()
    print(json.dumps({"ray.shutdown_s": round(time.time() - started, 2), "per_process_s": stopped}), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
