"""One run at a time per output folder: two runs into the same --output_dir would both train for
minutes and then trip over each other's partial folders and logs. A lock file beside the output
(`.NAME.lock`, holding the holder's pid and host) is taken with flock before anything is written;
the operating system releases a flock when its process ends, however it ends, so the lock of a
crashed run is free to take (the file it left is taken over, and said so)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from raybooth.errors import RayboothError
from raybooth.terminal.log import log


def lock_path(output_dir: Path) -> Path:
    output = Path(output_dir).expanduser().absolute()
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Hold the lock on `output_dir` while the block runs; a RayboothError naming the holder if
    another process holds it. The lock file is gone once the block ends."""
    path, output = lock_path(output_dir), Path(output_dir).expanduser().absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _take(path, output)
    except OSError as error:  # the lock's folder is the output's: the output could not be written either
        raise RayboothError(f"--output_dir {output} cannot be written: {error.strerror or error}") from None
    try:
        yield path
    finally:
        # Unlinked before the flock goes with the close: a process that opened the file meanwhile
        # finds it unlinked once it gets the flock, and tries again (_take).
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _take(path: Path, output: Path) -> int:
    """The open, flocked lock file, written with our pid and host."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RayboothError(f"--output_dir {output} is being written by another run ({holder or 'starting'}; "
                                    f"lock {path}): wait for it to finish, or choose another folder") from None
            # A filesystem without locks (some network mounts): run unguarded rather than not at all.
            log(f"warning: cannot lock {path} ({error.strerror}); make sure no other run writes to {output}")
            return os.open(os.devnull, os.O_RDONLY)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and unlinked by its holder between our open and our flock
            os.close(fd)
            continue
        stale = _read(fd)
        if stale:
            log(f"taking over {path}, left by a run that ended without releasing it ({stale}, no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return fd


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    return ""
