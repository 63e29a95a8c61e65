"""Image folders: find the images in one, and refuse bad ones early with a message that names
the offending file, before any Ray task or GPU is involved."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from raybooth.errors import RayboothError
from raybooth.log import log

# What Ray Data's read_images reads, plus webp.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
# Sheets of many samples (grids, reports) are encoded at zlib level 1, not PIL's 6: a grid of 7x9
# cells of 512 px took 1.0 s rather than 4.5 s, for 36% more bytes (bench/png_encoding.py); the
# run waits for them.
SHEET_PNG = {"format": "PNG", "compress_level": 1}


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (hidden ones aside), sorted; none if it does not exist."""
    if not Path(folder).is_dir():
        return []
    return sorted(p.absolute() for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(folder: Path, role: str, may_be_empty: bool = False, resolution: int | None = None) -> list[Path]:
    """The images in `folder`, each decoded once to prove it is readable. With `may_be_empty`,
    a missing or empty folder gives no images rather than an error. Images that will be changed
    on the way in get a warning naming them: transparency flattened onto white, or (given the
    training `resolution`) a size that must be scaled up.

    `role` names the folder in messages ("instance images"). Hidden files are ignored; any other
    file that is not an image is an error rather than silently skipped, since a subject set
    of five photos with one unread is not what the user asked to train on.
    """
    folder = Path(folder).expanduser().absolute()  # Ray tasks do not share our working directory
    if may_be_empty and not folder.exists():
        return []
    if not folder.exists():
        raise RayboothError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise RayboothError(f"{role} folder {folder} is not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except PermissionError:
        raise RayboothError(f"{role} folder {folder} cannot be read (permission denied)") from None
    strangers = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strangers:
        raise RayboothError(f"{role} folder {folder} holds files that are not images: {', '.join(strangers[:5])}"
                            f"{' ...' if len(strangers) > 5 else ''} (images end in {' '.join(IMAGE_SUFFIXES)})")
    if not files and may_be_empty:
        return []
    if not files:
        raise RayboothError(f"{role} folder {folder} holds no images")
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        checked = list(pool.map(check_image, files))
    for path, (size, transparent) in zip(files, checked):
        if transparent:
            log(f"warning: {path} has transparency; it is flattened onto white")
        if resolution and min(size) < resolution:
            log(f"warning: {path} is {size[0]}x{size[1]}, smaller than the training resolution of {resolution} px; "
                "it will be scaled up (blurrier)")
    return files


def check_image(path: Path) -> tuple[tuple[int, int], bool]:
    """(width and height, whether it has transparency) of a readable image, else a clear error."""
    try:
        with open_image(path) as image:  # PIL's warning for huge images is replaced by ours below
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # a JPEG at 1/8: less memory
            image.load()  # a whole decode all the same: truncated files pass Image.verify() but fail here
            transparent = has_transparency(image)
    except Exception as error:  # PIL raises many types for bad files
        raise RayboothError(f"{path} is not a readable image ({type(error).__name__}: {error})") from None
    if size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        log(f"warning: {path} is {size[0]}x{size[1]}, an unusually large image; it is read at a reduced scale")
    return size, transparent


def open_image(path: Path) -> Image.Image:
    """`Image.open` without PIL's decompression-bomb warning: `check_image` warns about huge images
    itself, naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB. PIL's own conversion clips 16- and 32-bit grayscale to 255, which
    turns a 16-bit photo white: those are scaled down instead. Transparency is flattened onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if has_transparency(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def read_rgb(path: Path) -> np.ndarray:
    """A whole image as uint8 RGB (HWC), upright by its EXIF orientation and converted as
    training reads it (`to_rgb`): for judging samples against the subject's photos."""
    with open_image(path) as image:
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))
