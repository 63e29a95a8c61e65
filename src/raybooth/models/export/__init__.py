"""Taking a result anywhere: a fine-tuned pipeline as one original-layout checkpoint file
(single_file.py, by the tables of ldm.py laid out per family in sd.py and sdxl.py), a LoRA
adapter in kohya's format (kohya.py): the files ComfyUI and AUTOMATIC1111 load. `export` is
`raybooth export`; `write_extra_formats`, what `train --save_single_file` and
`--output_kohya_format` add to a finished output folder."""

from __future__ import annotations

from pathlib import Path

from raybooth.terminal.log import log


def export(model_dir: Path, format: str, output_file: Path, half: bool = False, overwrite: bool = False) -> Path:
    """`model_dir` (a pipeline folder, or a LoRA folder for "kohya") written as `output_file`."""
    if format == "kohya":
        from raybooth.models.export.kohya import export_kohya

        return export_kohya(model_dir, output_file, half, overwrite)
    from raybooth.models.export.single_file import export_single_file

    return export_single_file(model_dir, output_file, half, overwrite)


def write_extra_formats(folder: Path, output_dir: Path, single_file: bool, kohya: bool) -> None:
    """Into the finished output `folder` (the partial folder that becomes `output_dir`): the
    pipeline as one checkpoint named after `output_dir`, and the LoRA adapter in kohya's format."""
    from raybooth.models.output import KOHYA_WEIGHTS, single_file_name

    if single_file:
        log(f"wrote {export(folder, 'single-file', Path(folder) / single_file_name(output_dir)).name}, the "
            "pipeline as one checkpoint file for ComfyUI and AUTOMATIC1111")
    if kohya:
        log(f"wrote {export(folder, 'kohya', Path(folder) / KOHYA_WEIGHTS).name}, the adapter in kohya's format "
            "for ComfyUI and AUTOMATIC1111")
