"""Image folders: find the images in one, and refuse bad ones early with a message that names
the offending file, before any Ray task or GPU is involved."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from raybooth.errors import RayboothError

# What Ray Data's read_images reads, plus webp.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (hidden ones aside), sorted; none if it does not exist."""
    if not Path(folder).is_dir():
        return []
    return sorted(p.absolute() for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(folder: Path, role: str, may_be_empty: bool = False) -> list[Path]:
    """The images in `folder`, each decoded once to prove it is readable. With `may_be_empty`,
    a missing or empty folder gives no images rather than an error.

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
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    strangers = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strangers:
        raise RayboothError(f"{role} folder {folder} holds files that are not images: {', '.join(strangers[:5])}"
                            f"{' ...' if len(strangers) > 5 else ''} (images end in {' '.join(IMAGE_SUFFIXES)})")
    if not files and may_be_empty:
        return []
    if not files:
        raise RayboothError(f"{role} folder {folder} holds no images")
    for path in files:
        check_image(path)
    return files


def check_image(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: truncated files pass Image.verify() but fail here
    except Exception as error:  # PIL raises many types for bad files
        raise RayboothError(f"{path} is not a readable image ({type(error).__name__}: {error})") from None
