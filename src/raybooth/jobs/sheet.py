"""What a batch ends with beside the subjects' folders: batch.json (per subject: status, steps,
final loss, wall time, the measures), batch.png (a row per subject: its photos, then its
samples) and the table printed at the end."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from raybooth.evaluate.measure import image_grid
from raybooth.errors import RayboothError
from raybooth.files.images import SHEET_PNG, image_files, read_rgb
from raybooth.files.writes import write_atomically, write_whole

BATCH_FILE, SHEET_FILE = "batch.json", "batch.png"
LABEL_WIDTH, PHOTOS, SAMPLES = 110, 4, 8
TABLE_MEASURES = ("subject_fidelity", "prompt_fidelity", "prior_leakage")


def write_batch_json(path: Path, subjects: dict[str, dict], about: dict) -> None:
    text = json.dumps({**about, "subjects": subjects}, indent=2) + "\n"
    write_atomically(path, text.encode())


def draw_sheet(path: Path, rows: dict[str, tuple[Path, Path]]) -> None:
    """`rows`: {name: (photos folder, samples folder)}; a subject without samples shows its photos
    alone, and a photo that cannot be read (a failed subject's) is left out."""
    cells, size = [], 64
    for photos_dir, samples_dir in rows.values():
        photos, samples = readable(image_files(photos_dir)[:PHOTOS]), readable(image_files(samples_dir)[:SAMPLES])
        cells.append(photos + samples)
        size = max([size] + [image.shape[0] for image in samples])
    grid = image_grid([row or [] for row in cells], min(size, 256))
    sheet = Image.new("RGB", (LABEL_WIDTH + grid.width, grid.height), "white")
    sheet.paste(grid, (LABEL_WIDTH, 0))
    draw, font, step = ImageDraw.Draw(sheet), ImageFont.load_default(), (grid.height - 2) / max(1, len(rows))
    for index, name in enumerate(rows):
        draw.text((3, 4 + index * step), name[:18], fill="black", font=font)
    write_whole(path, lambda partial: sheet.save(partial, **SHEET_PNG))


def readable(paths: list[Path]) -> list:
    images = []
    for path in paths:
        try:
            images.append(read_rgb(path))
        except (OSError, ValueError, RayboothError):
            continue
    return images


def table(subjects: dict[str, dict]) -> str:
    """One line per subject: status, steps, final loss, minutes, and the tuned model's main measures."""
    header = f"{'subject':<18} {'status':<8} {'steps':>6} {'loss':>8} {'time':>8}" + "".join(
        f" {name.replace('_', ' '):>16}" for name in TABLE_MEASURES)
    lines = [header]
    for name, result in subjects.items():
        after = ((result.get("measures") or {}).get("after")) or {}
        loss = result.get("final_loss")
        lines.append(f"{name[:18]:<18} {result['status']:<8} {result.get('steps', '-')!s:>6} "
                     f"{'-' if loss is None else f'{loss:.4f}':>8} {result.get('seconds', 0):>7.0f}s" + "".join(
                         f" {'-' if after.get(m) is None else f'{after[m]:.3f}':>16}" for m in TABLE_MEASURES))
    return "\n".join(lines)
