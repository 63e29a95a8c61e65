"""What Ray's C++ core writes straight to this process's stderr (file descriptor 2), past
Python's `sys.stderr` and so past raylog.py's sorting (for example Ray Data's actor-pool
warning from core_worker.cc): sent to the command's Ray log file. Python's own writes to
`sys.stderr`, our lines and progress bars among them, keep the terminal."""

from __future__ import annotations

import io
import os
import sys
import threading
from typing import Callable


def _writes_to_descriptor_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):  # a test's capture, say
        return False


class NativeStderr:
    """Between `start` and `stop`, descriptor 2 is a pipe whose lines go to `write_line`."""

    def __init__(self, write_line: Callable[[str], None]):
        self.write_line = write_line
        self.terminal: int | None = None  # descriptor 2 as it was
        self.python_stderr = None
        self.replacement = None  # our sys.stderr on the terminal's descriptor, when we set one
        self.reader: threading.Thread | None = None

    def start(self) -> None:
        sys.stderr.flush()
        try:
            terminal = os.dup(2)
            read_end, write_end = os.pipe()
            os.dup2(write_end, 2)
            os.close(write_end)
        except OSError:  # no descriptor 2 to take over: C++ lines go wherever they went
            return
        self.terminal = terminal
        self.python_stderr = sys.stderr
        if _writes_to_descriptor_2(sys.stderr):  # Python's writes keep going where they went
            self.replacement = open(os.dup(terminal), "w", buffering=1, errors="backslashreplace",
                                    encoding=getattr(sys.stderr, "encoding", None))
            sys.stderr = self.replacement
        self.reader = threading.Thread(target=self._copy, args=(read_end,), daemon=True, name="raybooth-native-stderr")
        self.reader.start()

    def _copy(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                self.write_line(line.decode(errors="replace"))

    def stop(self) -> None:
        if self.terminal is None:
            return
        # Only our own stream is put back: whatever else sys.stderr is now (a caller's redirect,
        # made after this started) is not ours to close or replace.
        if self.replacement is not None and sys.stderr is self.replacement:
            sys.stderr = self.python_stderr
            self.replacement.close()
        self.replacement = None
        os.dup2(self.terminal, 2)  # closes the pipe's last write end here: the reader reads to its end
        os.close(self.terminal)
        self.terminal = None
        # A process started meanwhile may hold the pipe open; its lines still go to the file.
        self.reader.join(timeout=1)
