"""Image folders and photos: find the images in one and refuse bad ones early with a message that
names the offending file, before any Ray task or GPU is involved; and read a photo as training
reads it, decoded once, upright by its EXIF orientation and resized on its shorter side to the
training resolution. The workers keep the result in memory (train/batches.py) and crop from
there: a few hundred images need no per-epoch pipeline. Ray Data's tasks read them for Ray
Train's worker processes; the one worker of local mode, the command's own process, reads them
itself with a few threads, beside the model's load and before Ray is up: Ray Data's tasks and the
object store's round trip took 5.4-5.9 s on an H100 machine (bench/RESULTS.md)."""

from __future__ import annotations

import errno
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from raybooth.errors import RayboothError
from raybooth.files.captions import CAPTION_SUFFIX, is_caption_file
from raybooth.terminal.log import log

# What Ray Data's read_images reads, plus webp.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


# Sheets of many samples (grids, reports) are encoded at zlib level 1, not PIL's 6: a grid of 7x9
# cells of 512 px took 1.0 s rather than 4.5 s, for 36% more bytes (bench/studies/png_encoding.py); the
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

    `role` names the folder in messages ("instance images"). Hidden files are ignored, and so are
    captions (NAME.txt beside an image NAME.*, metadata.jsonl or .csv: the driver reads the
    photos' own with files/captions.py); any other file that is not an image is an error rather
    than silently skipped, since a subject set of five photos with one unread is not what the
    user asked to train on.
    """
    folder = Path(folder).expanduser().absolute()  # Ray tasks do not share our working directory
    if may_be_empty and not folder.exists():
        return []
    if not folder.exists():
        raise RayboothError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise RayboothError(f"{role} folder {folder} is not a folder")
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError:
        raise RayboothError(f"{role} folder {folder} cannot be read (permission denied)") from None
    check_links(entries)
    files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.stem for p in files}
    strangers = [p.name for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                 and not is_caption_file(p, stems)]
    if strangers:
        caption = any(name.lower().endswith(CAPTION_SUFFIX) for name in strangers)
        raise RayboothError(f"{role} folder {folder} holds files that are not images: {', '.join(strangers[:5])}"
                            f"{' ...' if len(strangers) > 5 else ''} (images end in {' '.join(IMAGE_SUFFIXES)}"
                            f"{'; the caption of NAME.jpg is NAME.txt' if caption else ''})")
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


def check_links(paths: list[Path]) -> None:
    """A photo (or its caption) that is a broken symbolic link (its target gone, or a loop) is an
    error, as an unreadable photo is, rather than a file silently left out."""
    for path in paths:
        wanted = path.suffix.lower() in IMAGE_SUFFIXES or is_caption_file(path)  # any .txt: it may be a caption
        if wanted and path.is_symlink() and not path.exists():
            try:
                os.stat(path)
                continue  # appeared meanwhile
            except OSError as error:
                what = ("a symbolic link in a loop" if error.errno == errno.ELOOP
                        else f"a symbolic link to {os.readlink(path)}, which does not exist")
            raise RayboothError(f"{path} is {what}; fix the link or remove it")


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


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as it is seen upright (after its EXIF orientation), read from
    its header: SDXL's micro-conditioning takes each photo's size before it is resized."""
    with open_image(path) as image:
        width, height = image.size
        if image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8):  # turned a quarter: the sides swap
            width, height = height, width
    return height, width


ORIENTATION_TAG = 0x0112


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


# --image_interpolation_mode's names (torchvision's, lowercased, as diffusers' scripts take them)
# and the PIL filter each stands for: torchvision resizes a PIL image with PIL's own filter, and
# its nearest and nearest_exact are both PIL's nearest (its pil_modes_mapping).
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "nearest_exact": Image.Resampling.NEAREST,
              "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
# raybooth's filter since before the flag: diffusers' scripts default to lanczos, which differs
# from it by a few levels at edges; runs and checkpoints made before keep their pixels.
DEFAULT_INTERPOLATION = "bicubic"


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = DEFAULT_INTERPOLATION) -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (photos come at 600-4000 px),
    with the filter `interpolation` names (RESAMPLING)."""
    scale = size / min(image.size)
    new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return image if new_size == image.size else image.resize(new_size, RESAMPLING[interpolation])


def load_image(path: str | Path, resolution: int, interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """One image as uint8 RGB (HWC), upright by its EXIF orientation, shorter side `resolution`."""
    with open_image(path) as image:
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale for a fraction of the time, never below the size we need.
        scale = resolution / min(image.size)
        image.draft("RGB", (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        image = ImageOps.exif_transpose(image)
        return np.asarray(resize_shorter_side(to_rgb(image), resolution, interpolation))


def load_images(batch: dict[str, np.ndarray], resolution: int,
                interpolation: str = DEFAULT_INTERPOLATION) -> dict[str, list]:
    return {"path": list(batch["path"]),
            "image": [load_image(path, resolution, interpolation) for path in batch["path"]]}


def read_images(paths: list[str], resolution: int, threads: int = 8,
                interpolation: str = DEFAULT_INTERPOLATION) -> dict[str, np.ndarray]:
    """{path: image} for `paths`, as Ray Data's tasks make them, read by a few threads of this
    process (Pillow decodes and resizes without holding Python's lock)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(zip(paths, pool.map(lambda path: load_image(path, resolution, interpolation), paths)))
