"""Writes that land whole or not at all: a file through a hidden partial name and a rename, and a
PNG encoded to bytes first, so that an interrupted run never leaves a broken image that a re-run
would count as done."""

from __future__ import annotations

import io
import os
from pathlib import Path


def png_bytes(image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **({"format": "PNG"} | options))
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """A file appears whole or not at all, so an interrupted run never leaves a broken image
    that a re-run would count as done."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
