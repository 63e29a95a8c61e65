"""Progress of making images (class images, samples, `raybooth generate`): a tqdm bar where the
user's terminal shows one, else a status line now and then, as in a log file or CI output."""

from __future__ import annotations

import sys
import time
from typing import Callable


def terminal_shows_bars() -> bool:
    return sys.stderr.isatty()


class ImageProgress:
    """`update(n)` as images are made. With `bar`, a tqdm bar: in a Ray worker, Ray's tqdm, which
    the driver draws among its other output; elsewhere tqdm itself, on stderr. Without, a line
    through `say` at each update at least `every` images after the last."""

    def __init__(self, total: int, what: str, say: Callable[[str], None], bar: bool, every: int = 1,
                 where: str = "on this worker"):
        self.total, self.what, self.say, self.every, self.where = total, what, say, every, where
        self.done = self.last_said = 0
        self.started = time.monotonic()
        self.bar = None
        if bar:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                from ray.experimental.tqdm_ray import tqdm as ray_tqdm

                self.bar = ray_tqdm(total=total, desc=what, unit="image")
            else:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=what, unit="image", file=sys.stderr, dynamic_ncols=True)

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done - self.last_said >= self.every or self.done == self.total:
            self.last_said = self.done
            self.say(f"made {self.done}/{self.total} {self.what} {self.where} ({self.rate():.2f} images/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.say(f"made {self.done} {self.what} {self.where} ({self.rate():.2f} images/s)")
