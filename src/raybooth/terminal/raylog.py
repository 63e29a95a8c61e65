"""Ray's own output away from the terminal: into a log file, unless --verbose.

Most of what Ray prints during a command comes from its processes (Ray Train's controller and
workers, Ray Data's actors): each writes to its own stderr, and Ray's driver prints what they
wrote (`ray.init(log_to_driver=True)`). Our workers' progress lines take the same path, so the
forwarding stays on; raybooth takes over the driver's printing of it instead, and sorts lines:
its own ("[raybooth ...") to the terminal, Ray's to the log file. Python warnings raised in this
process (Ray's deprecation notices among them) go to the file as well.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, TextIO

from raybooth.terminal.log import PREFIX, log
from raybooth.terminal.native import NativeStderr

RAY_PRINTER = "ray_print_logs"  # the name Ray's driver registers its printing of workers' output under


TQDM_MAGIC = "__ray_tqdm_magic_token__"  # marks ray.experimental.tqdm_ray's progress-bar updates


class RayOutput:
    """Where Ray's output goes during one command: `log_file` (opened on the first line for it),
    and the terminal too when `verbose`."""

    def __init__(self, log_file: Path, verbose: bool, bars: bool | None = None):
        self.log_file, self.verbose = Path(log_file), verbose
        self.bars = sys.stderr.isatty() if bars is None else bars  # workers' progress bars shown
        self.file: TextIO | None = None
        self.lock = threading.Lock()
        # Our latest lines: on an attached cluster a worker's line may be forwarded twice, and
        # each carries its time stamp, so a repeat among them is the same line again.
        self.recent: deque[str] = deque(maxlen=256)
        self.showwarning = warnings.showwarning  # what showed warnings before this command
        self.native: NativeStderr | None = None  # Ray's C++ lines on descriptor 2, unless verbose

    def write(self, line: str) -> None:
        with self.lock:
            try:
                if self.file is None:
                    self.log_file.parent.mkdir(parents=True, exist_ok=True)
                    self.file = open(self.log_file, "a", buffering=1, encoding="utf-8")
                    self.file.write(f"=== raybooth {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                if not self.file.closed:
                    self.file.write(line.rstrip("\n") + "\n")
            except OSError:  # a log that cannot be written must not stop the command
                pass

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()

    def forwarded(self, data: dict, print_as_ray_does: Callable[[dict], None]) -> None:
        """One batch of lines a Ray process wrote: ours to the terminal, Ray's to the file."""
        if data.get("pid") == "autoscaler":  # its status every few seconds: Ray prints the events in it alone
            for line in autoscaler_events(data.get("lines", [])):
                self.write(f"(autoscaler) {line}")
            if self.verbose:
                print_as_ray_does(data)
            return
        who = " ".join(filter(None, [data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}"]))
        shown = []
        for line in data.get("lines", []):
            if line.startswith(PREFIX):
                if line not in self.recent:
                    self.recent.append(line)
                    shown.append(line)
            elif TQDM_MAGIC in line:
                if self.bars:
                    shown.append(line)
            else:
                self.write(f"({who}) {line}")
                if self.verbose:
                    shown.append(line)
        if shown:
            print_as_ray_does({**data, "lines": shown})

    def warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        if self.verbose:
            self.showwarning(message, category, filename, lineno, file, line)


class _Router:
    """Stands in for Ray's printer of forwarded output; sends each batch to the command's
    RayOutput, or prints it as Ray would where no command set one (as in a test's shared Ray)."""

    def __init__(self):
        self.target: RayOutput | None = None
        self.ray_printer: Callable[[dict], None] | None = None

    def __call__(self, data: dict) -> None:
        target, printer = self.target, self.ray_printer
        try:
            if target is not None:
                target.forwarded(data, printer)
            elif printer is not None:
                printer(data)
        except Exception:  # noqa: BLE001 - runs on Ray's log thread: a traceback there would reach the terminal
            pass


_router = _Router()


def take_over_forwarded_output() -> None:
    """Put the router in the place of Ray's printer, once per process, after `ray.init`. Without
    Ray's printer (log_to_driver off, or a Ray that renamed it) there is nothing to take over."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # an internal of Ray's that may move: then Ray prints as it always has
        return
    printer = next((handler for name, handler in dispatcher.handlers if name == RAY_PRINTER), None)
    if printer is None or printer is _router:
        return
    _router.ray_printer = printer
    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(RAY_PRINTER, _router)


def send_ray_output(log_file: Path, verbose: bool) -> RayOutput:
    """From now on, Ray's output in this process goes to `log_file` (and the terminal if `verbose`);
    says so once."""
    restore_ray_output()
    log(f"Ray's own output goes to {log_file}" + ("" if verbose else " (--verbose shows it here too)"))
    output = _router.target = RayOutput(log_file, verbose)
    warnings.showwarning = output.warning
    if not verbose:
        output.native = NativeStderr(lambda line: output.write(f"(ray core) {line}"))
        output.native.start()
    return output


def restore_ray_output() -> None:
    """Back to Ray's own printing (the CLI calls this when a command ends)."""
    output, _router.target = _router.target, None
    if output is not None:
        if output.native is not None:
            output.native.stop()
        warnings.showwarning = output.showwarning
        output.close()


def autoscaler_events(lines: list[str]) -> list[str]:
    """The events (nodes added, failures) among the autoscaler's status lines, as Ray picks them."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:  # an internal of Ray's that may move: then the file gets every line
        return lines
    return list(filter_autoscaler_events(lines))
