"""Each subject photo's own prompt, where it has one, in place of --instance_prompt: NAME.txt
beside NAME.jpg (the convention of kohya's and most other trainers), or with --caption_column a
column of the folder's metadata.jsonl or metadata.csv (Hugging Face's imagefolder layout, whose
file_name column names the photo: what diffusers' SDXL script reads through --dataset_name and
--caption_column). Read by the driver before Ray starts, so a bad caption file costs seconds, not
a worker's start. An empty caption means --instance_prompt, as in diffusers' script."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.terminal.log import log

CAPTION_SUFFIX = ".txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def is_caption_file(path: Path, stems: set[str] | None = None) -> bool:
    """Whether a file beside the photos holds captions: the folder's metadata, or a .txt (given
    the photos' `stems`, only one named as a photo is: another .txt is no one's caption)."""
    if path.name in METADATA_FILES:
        return True
    return path.suffix.lower() == CAPTION_SUFFIX and (stems is None or path.stem in stems)


def read_captions(folder: Path, photos: list[Path], caption_column: str | None) -> dict[str, str]:
    """{photo: its caption} (by the path as `photos` has it) for the photos that have a caption
    that is not empty: from NAME.txt files, or, with `caption_column`, from the folder's metadata.
    Anything that would leave a caption silently unread or misread is one line that names it."""
    folder = Path(folder).expanduser().absolute()
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_caption_file(p) and p.is_file())
    texts = [p for p in found if p.suffix.lower() == CAPTION_SUFFIX]
    metadata = [p for p in found if p.name in METADATA_FILES]
    if caption_column is None:
        if metadata:
            log(f"{metadata[0]} is left unread: pass --caption_column to train each photo on its caption there")
        return text_captions(texts, photos)
    if texts:  # two sources of one photo's prompt: which one the user meant is a guess
        raise RayboothError(f"--caption_column takes the captions from {' or '.join(METADATA_FILES)}, but {folder} "
                            f"also holds caption files ({', '.join(p.name for p in texts[:3])}"
                            f"{' ...' if len(texts) > 3 else ''}): keep one kind")
    return metadata_captions(folder, metadata, photos, caption_column)


def clean(caption: str) -> str:
    """One line, as a prompt is given: line breaks and runs of spaces are one space."""
    return " ".join(caption.split())


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RayboothError(f"{path} cannot be read ({error.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of it
    except UnicodeDecodeError as error:
        raise RayboothError(f"{path} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x}); save it "
                            "as UTF-8") from None


def text_captions(texts: list[Path], photos: list[Path]) -> dict[str, str]:
    """NAME.txt is the caption of each photo named NAME (NAME.jpg, NAME.png)."""
    by_stem: dict[str, list[Path]] = {}
    for photo in photos:
        by_stem.setdefault(photo.stem, []).append(photo)
    captions = {}
    for text in texts:
        if text.stem not in by_stem:  # a typo in its name would leave a photo on the instance prompt unnoticed
            raise RayboothError(f"{text} is no photo's caption: no photo in {text.parent} is named {text.stem}.* "
                                "(the caption of NAME.jpg is NAME.txt)")
        caption = clean(read_text(text))
        if caption:
            captions.update({str(photo): caption for photo in by_stem[text.stem]})
    return captions


def metadata_rows(path: Path) -> tuple[list[dict], set[str]]:
    """The rows of metadata.jsonl (a JSON object a line) or metadata.csv (a header line), and the
    columns they have."""
    text = read_text(path)
    if path.suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            return list(reader), set(reader.fieldnames or [])
        except csv.Error as error:
            raise RayboothError(f"{path} is not valid CSV ({error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RayboothError(f"{path} line {number} is not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise RayboothError(f"{path} line {number} is not a JSON object of columns")
        rows.append(row)
    return rows, {column for row in rows for column in row}


def metadata_captions(folder: Path, metadata: list[Path], photos: list[Path], column: str) -> dict[str, str]:
    """The `column` of the folder's metadata, by its file_name column; a photo it has no row for
    (or an empty caption) trains on the instance prompt."""
    if not metadata:
        raise RayboothError(f"--caption_column {column} reads the captions from {' or '.join(METADATA_FILES)} in "
                            f"{folder}, which holds neither")
    if len(metadata) > 1:
        raise RayboothError(f"{folder} holds both {' and '.join(METADATA_FILES)}: keep one")
    path = metadata[0]
    rows, columns = metadata_rows(path)
    for needed, why in (("file_name", "naming each row's photo"), (column, "that --caption_column names")):
        if needed not in columns:
            raise RayboothError(f"{path} has no column {needed!r} {why} (its columns: "
                                f"{', '.join(sorted(columns)) or 'none'})")
    by_path = {os.path.normpath(photo): str(photo) for photo in photos}
    captions: dict[str, str] = {}
    named: set[str] = set()
    for number, row in enumerate(rows, 1):
        name, caption = row.get("file_name"), row.get(column)
        photo = by_path.get(os.path.normpath(folder / name)) if isinstance(name, str) and name.strip() else None
        if photo is None:
            raise RayboothError(f"{path} row {number}: file_name {name!r} is not a photo in {folder}")
        if photo in named:
            raise RayboothError(f"{path} row {number}: {name} has a row already")
        named.add(photo)
        if caption is not None and not isinstance(caption, str):
            raise RayboothError(f"{path} row {number}: the {column} of {name} is {caption!r}, not text")
        if caption and clean(caption):
            captions[photo] = clean(caption)
    return captions


def captions_line(captions: dict[str, str], photos: int, caption_column: str | None) -> str | None:
    """What the run trains each photo on, in a line; None where every photo has the instance prompt."""
    if not captions:
        return None
    source = f"the {caption_column} column of the folder's metadata" if caption_column else "their .txt captions"
    others = "" if len(captions) == photos else "; the others train with --instance_prompt"
    return f"{len(captions)} of {photos} photos train with their own prompt, from {source}{others}"
