"""Progress and status lines for people, on stderr (stdout stays free for results such as paths)."""

from __future__ import annotations

import logging
import sys
import time
import warnings

_clock_start = time.time()


PREFIX = "[raybooth "  # starts each of our lines: how they are told from Ray's in forwarded output


def clock_start() -> float:
    """When this process's clock started: the command's start, in the process that runs it."""
    return _clock_start


def set_clock(start: float) -> None:
    """Count elapsed time from `start` (the command's start, passed to Ray workers)."""
    global _clock_start
    _clock_start = start


def log(message: str) -> None:
    """One line, stamped with the seconds since the command started: where a run's time goes."""
    # Not print(): Ray Train patches print() on its workers and would show each line twice.
    sys.stderr.write(f"{PREFIX}{time.time() - _clock_start:6.1f}s] {message}\n")
    sys.stderr.flush()


# bitsandbytes, which diffusers, transformers and peft import when they find it installed, warns on
# import on a CPU with AVX512-BF16 that it "Failed to load CPU gemm_4bit_forward" (an optional
# 4-bit kernel from the `kernels` package, which raybooth never uses), through its module's logger
# and Python's last-resort handler. Its level is set here, at our first import, because that
# import of bitsandbytes may come before quiet_model_libraries; its errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quiet_model_libraries() -> None:
    """Keep transformers' and diffusers' chatter (loading bars, notices about optional packages)
    out of our progress lines. Call before the first pipeline import in a process."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    # With --compile: diffusers' up-samplers check torch's version through an lru_cache, which
    # Dynamo traces through, warning each time it compiles one.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
