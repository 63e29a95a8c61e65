"""What local mode's one worker finds ready: models loading on a thread of their own since before
Ray started (driver/preload.py starts them), and the images read meanwhile. The worker takes them
once, if they sit on the devices its plan gives it."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from raybooth.train.plan import TrainPlan


def local_devices(use_gpu: bool, gpus_per_worker: int) -> list[str]:
    """The devices of the one worker in this process: this machine's first GPUs, or its CPU."""
    return [f"cuda:{index}" for index in range(gpus_per_worker)] if use_gpu else ["cpu"]


class Preloading:
    """Models loading on a thread of their own; `take` waits for them and hands them over once,
    keeping no reference, so that they go (and their GPU memory) when the loop is done with them."""

    def __init__(self, load: Callable[[], tuple[list[str], Any]]):
        self.done = threading.Event()
        self.loaded: tuple[list[str], Any] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.loaded = load()
            except BaseException as error:  # raised where the worker takes the models
                self.error = error
            finally:
                self.done.set()

        threading.Thread(target=run, name="raybooth-preload", daemon=True).start()  # daemon: Ctrl-C need not wait

    def take(self) -> tuple[list[str], Any]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        loaded, self.loaded = self.loaded, None
        return loaded


@dataclass
class Preloaded:
    """What local mode's one worker finds ready: the models, and the images as Ray Data would read them."""

    models: Preloading  # (device names, models)
    images: Preloading  # ({path: image} of the instance images, of the class images)


def preloaded_models(preloaded: Preloaded | None, plan: TrainPlan):
    """In the worker: the models `preload` loaded, once loaded, where they sit on the devices the
    plan gives it; else None (and it loads them itself)."""
    if preloaded is None:
        return None
    devices, models = preloaded.models.take()
    return models if devices == plan.local_devices else None
