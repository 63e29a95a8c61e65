"""PNG encoding of a sample sheet (a 7x9 grid of 512 px cells, as `raybooth run`'s before-and-after
grid for SD 1.5) at PIL's default zlib level 6 and at raybooth's level 1 (images.SHEET_PNG): seconds
on one core and bytes. Cells are smooth random fields, textured as samples are.

    python bench/studies/png_encoding.py
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
from PIL import Image


def sheet() -> Image.Image:
    rng = np.random.default_rng(0)
    fields = [np.clip(rng.normal(0, 1, (64, 64, 3)).cumsum(0).cumsum(1) * 4 + 128, 0, 255).astype(np.uint8)
              for _ in range(8)]
    cells = [np.asarray(Image.fromarray(field).resize((512, 512), Image.Resampling.BICUBIC)) for field in fields]
    rows = [np.concatenate([cells[(row * 9 + column) % 8] for column in range(9)], axis=1) for row in range(7)]
    return Image.fromarray(np.concatenate(rows, axis=0))


if __name__ == "__main__":
    image = sheet()
    for level in (6, 1):
        buffer = io.BytesIO()
        started = time.perf_counter()
        image.save(buffer, format="PNG", compress_level=level)
        print(json.dumps({"compress_level": level, "size": image.size, "seconds": round(time.perf_counter() - started, 2),
                          "kilobytes": buffer.tell() // 1000}))
