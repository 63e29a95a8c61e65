"""The end of a run, in the output folder beside the model: metrics.json (final loss, steps,
throughput, wall time, time per phase) and report.png, four panels on one page: the subject's
photos, the validation grids over the run, the final samples, and the loss curve. The panels'
boxes are in the PNG's "panels" text field, for tools (and tests) that read the page."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from raybooth.config.watch import METRICS_FILE, REPORT_FILE
from raybooth.files.images import SHEET_PNG, load_image
from raybooth.models.output import TRAINING_LOG
from raybooth.terminal.log import log
from raybooth.watch.folders import RunLogs

PANEL_SIZE = (640, 480)
TITLE_HEIGHT = 32
PANELS = ("subject", "validation", "samples", "loss")  # left to right, top to bottom
MOST_TILES = 16
TILE_SIDE = 256  # pixels on a tile's shorter side as read: more than a cell of a panel shows


def write_metrics(folder: Path, history: list[dict], final: dict, wall_time_s: float, logs_dir: Path,
                  grids: list[Path]) -> dict:
    metrics = {
        "steps": history[-1]["step"] if history else 0, "steps_run": final.get("steps_run"),
        "final_loss": final.get("loss"), "final_instance_loss": final.get("instance_loss"),
        "final_prior_loss": final.get("prior_loss"), "learning_rate": final.get("lr"),
        "images_per_s": final.get("images_per_s"), "wall_time_s": round(wall_time_s, 3),
        "phases_s": final.get("phases_s", {}), "logs_dir": str(logs_dir),
        "validation_grids": [str(path.relative_to(path.parents[1])) for path in grids],
        **{key: value for key, value in final.items() if "gpu" in key}}  # rank 0's GPU memory, on GPUs
    (Path(folder) / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics


def panel_boxes() -> dict[str, tuple[int, int, int, int]]:
    """Each panel's (left, top, right, bottom) on the page, title bar included."""
    width, height = PANEL_SIZE
    return {name: ((i % 2) * width, (i // 2) * height, (i % 2 + 1) * width, (i // 2 + 1) * height)
            for i, name in enumerate(PANELS)}


def draw_report(path: Path, photos: list[Path], grids: list[Path], samples: list[Path], history: list[dict],
                title: str) -> None:
    width, height = PANEL_SIZE
    page = Image.new("RGB", (2 * width, 2 * height), "white")
    content = (width, height - TITLE_HEIGHT)
    panels = {
        "subject": (f"the subject: {len(photos)} photos", tiles(_open(photos), content)),
        "validation": (f"validation over the run: {len(grids)} grids" if grids else "validation: none "
                       "(--validation_prompt)", tiles(_open(_spread(grids)), content, [g.stem for g in _spread(grids)])),
        "samples": (f"final samples: {len(samples)}" if samples else "final samples: none (--sample_prompts)",
                    tiles(_open(samples[:MOST_TILES]), content)),
        "loss": (f"loss over {len(history)} steps ({title})", loss_curve(history, content)),
    }
    draw = ImageDraw.Draw(page)
    boxes = panel_boxes()
    for name, (caption, image) in panels.items():
        left, top, right, bottom = boxes[name]
        draw.rectangle((left, top, right - 1, top + TITLE_HEIGHT - 1), fill=(40, 44, 52))
        draw.text((left + 10, top + 8), caption, fill="white", font=font(16))
        page.paste(image, (left, top + TITLE_HEIGHT))
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(200, 200, 200))
    info = PngInfo()
    info.add_text("panels", json.dumps(boxes))
    info.add_text("made", time.strftime("%Y-%m-%d %H:%M:%S"))
    page.save(Path(path).with_name(f".{Path(path).name}.partial"), pnginfo=info, **SHEET_PNG)
    Path(path).with_name(f".{Path(path).name}.partial").replace(path)


def report_run(cfg, logs: RunLogs, partial: Path, photos: list[Path], samples: list[Path], started: float) -> None:
    """metrics.json and report.png into the output about to be swapped in, with the logs folder
    when it lives there. Rank 0 left the numbers only it knows in metrics.json (RunWatch.finish)."""
    try:
        history = json.loads((partial / TRAINING_LOG).read_text())["history"]
        final = json.loads((partial / METRICS_FILE).read_text()) if (partial / METRICS_FILE).is_file() else {}
        grids = sorted(logs.validation.glob("step-*.png"))
        write_metrics(partial, history, final, time.time() - started, logs.final_run_folder(cfg.output_dir), grids)
        draw_report(partial / REPORT_FILE, photos, grids, [path for path in samples if path.is_file()], history,
                    title=Path(cfg.output_dir).name)
        log(f"report of the run: {Path(cfg.output_dir).expanduser().absolute() / REPORT_FILE} "
            f"(numbers in {METRICS_FILE})")
    except (OSError, ValueError, KeyError) as error:  # a trained model is worth more than its report
        log(f"warning: could not write the run's report: {error!r}")
    finally:
        logs.keep_with_output(cfg.output_dir, partial)  # after the grids are read from where they are


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _open(paths: list[Path]) -> list[Image.Image]:
    """Photos and samples for the page, read as training reads them (upright by their EXIF
    orientation, 16-bit scaled, a JPEG decoded at the scale it needs): a 10,000 px photo costs
    a cell's size, not 300 MB."""
    return [Image.fromarray(load_image(path, TILE_SIDE)) for path in paths]


def _spread(paths: list[Path], most: int = 9) -> list[Path]:
    """At most `most` of `paths`, evenly spread, the first and the last among them."""
    if len(paths) <= most:
        return list(paths)
    return [paths[round(i * (len(paths) - 1) / (most - 1))] for i in range(most)]


def tiles(images: list[Image.Image], size: tuple[int, int], labels: list[str] | None = None) -> Image.Image:
    """`images` scaled into a near-square grid of cells filling `size`, each under its label if any."""
    canvas = Image.new("RGB", size, (245, 245, 245))
    if not images:
        ImageDraw.Draw(canvas).text((size[0] // 2, size[1] // 2), "nothing to show", fill=(120, 120, 120),
                                    font=font(18), anchor="mm")
        return canvas
    columns = math.ceil(math.sqrt(len(images) * size[0] / size[1]))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = size[0] // columns, size[1] // rows
    label_h = 18 if labels else 0
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(images):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        thumb = ImageOps.contain(image, (max(1, cell_w - 8), max(1, cell_h - 8 - label_h)))
        canvas.paste(thumb, (x + (cell_w - thumb.width) // 2, y + 4))
        if labels:
            draw.text((x + cell_w // 2, y + 4 + thumb.height + 2), labels[index], fill=(60, 60, 60), font=font(12),
                      anchor="mt")
    return canvas


def loss_curve(history: list[dict], size: tuple[int, int]) -> Image.Image:
    """Per-step loss (light) and its moving average (dark) against the step."""
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    if not history:
        draw.text((size[0] // 2, size[1] // 2), "no steps", fill=(120, 120, 120), font=font(18), anchor="mm")
        return canvas
    left, top, right, bottom = 70, 16, size[0] - 20, size[1] - 40
    steps, losses = [row["step"] for row in history], [row["loss"] for row in history]
    low, high = min(losses), max(losses)
    pad = (high - low) * 0.05 or max(abs(high) * 0.05, 1e-3)
    low, high = low - pad, high + pad
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - first) / (last - first) * (right - left),
                bottom - (loss - low) / (high - low) * (bottom - top))

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    for values, color, width in ((losses, (150, 190, 240), 1), (smooth, (20, 60, 160), 3)):
        points = [point(step, value) for step, value in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=color, width=width)
        else:
            draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=color)
    small = font(13)
    for loss in (low + pad, high - pad):
        draw.text((left - 6, point(first, loss)[1]), f"{loss:.3g}", fill=(0, 0, 0), font=small, anchor="rm")
    for step in (steps[0], steps[-1]):
        draw.text((point(step, low)[0], bottom + 6), str(step), fill=(0, 0, 0), font=small, anchor="mt")
    draw.text(((left + right) // 2, bottom + 22), "step", fill=(0, 0, 0), font=small, anchor="mt")
    return canvas
