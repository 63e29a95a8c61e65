"""Writes that land whole or not at all: a file through a hidden partial name and a rename, a
PNG encoded to bytes first, so that an interrupted run never leaves a broken image that a re-run
would count as done; and moves that work across filesystems, landing whole all the same."""

from __future__ import annotations

import errno
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def png_bytes(image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **({"format": "PNG"} | options))
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """A file appears whole or not at all, so an interrupted run never leaves a broken image
    that a re-run would count as done."""
    write_whole(path, lambda partial: partial.write_bytes(data))


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write(a hidden partial name beside path)`, then the rename that makes `path` appear whole.
    A write that fails (or is interrupted) takes its partial file with it."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def move(source: Path, target: Path) -> None:
    """Move a file or folder to `target` (which must not exist), as a rename does, also where the
    two are on different filesystems (a tmpfs /tmp and a disk), where a rename fails with EXDEV:
    then it is copied to a hidden name beside `target`, renamed into place whole, and only then is
    `source` removed. Symbolic links are copied as links, as a rename keeps them, never followed."""
    source, target = Path(source), Path(target)
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    partial = target.with_name(f".{target.name}.moving-{uuid.uuid4().hex[:8]}")
    folder = source.is_dir() and not source.is_symlink()
    try:
        if folder:
            shutil.copytree(source, partial, symlinks=True)
        else:
            shutil.copy2(source, partial, follow_symlinks=False)
        os.rename(partial, target)  # within the target's filesystem: whole or not at all
    except BaseException:
        remove(partial)
        raise
    if folder:
        shutil.rmtree(source)
    else:
        source.unlink()


def remove(path: Path) -> None:
    """A file, link or folder gone, if it is there."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)
