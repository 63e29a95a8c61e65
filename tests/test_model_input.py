"""Model folders that lie, and sizes a model cannot take: each ends in one clear line before any
work, never in black images, a traceback or a process killed for memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.commands.cli import main
from raybooth.errors import RayboothError
from raybooth.models.folders import resolve_model_dir, resolve_resolution
from raybooth.watch.report import TILE_SIDE, _open


@pytest.mark.parametrize("resolution", [8, 256, 100000])
def test_a_resolution_far_from_the_models_own_is_refused_saying_why(tiny_model_dir, resolution):
    # The tiny model was trained at 64 px: it takes 16 to 128.
    with pytest.raises(RayboothError, match=f"--resolution {resolution} is outside what this model can take: it was "
                                            "trained at 64 px, and raybooth works from 16 to 128 px"):
        resolve_resolution(tiny_model_dir, resolution)


def test_a_resolution_near_the_models_own_is_taken(tiny_model_dir):
    assert [resolve_resolution(tiny_model_dir, side) for side in (16, 128, None)] == [16, 128, 64]


def test_training_at_a_size_the_model_cannot_take_stops_before_any_work(tiny_model_dir, subject_dir, tmp_path, capsys):
    assert main(["train", "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                 "--instance_images_dir", str(subject_dir), "--instance_prompt", "a photo of unqtkn toy car",
                 "--class_images_dir", str(tmp_path / "class"), "--class_prompt", "a photo of a toy car",
                 "--resolution", "100000", "--no_use_gpu"]) == 1
    assert "outside what this model can take" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "class").exists()


def test_weights_of_nan_make_an_error_not_black_images(tiny_model_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    unet = UNet2DConditionModel.from_pretrained(broken, subfolder="unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.fill_(float("nan"))
    unet.save_pretrained(broken / "unet")  # a valid header, values that lie
    out = tmp_path / "images"
    assert main(["generate", "--model_dir", str(broken), "--output_dir", str(out), "--prompts", "a toy car",
                 "--num_samples_per_prompt", "2", "--num_inference_steps", "2", "--no_use_gpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite values" in error and "weights are probably damaged" in error
    assert not list(out.glob("*.png"))


def test_a_model_folder_this_user_cannot_read_is_named_in_one_line(tiny_model_dir, monkeypatch):
    # Tests run as root, who reads everything: the denial is simulated where the folder is listed.
    listed = Path.iterdir

    def denied(self):
        if self.name == "unet":
            raise PermissionError(13, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(RayboothError, match=r"unet cannot be read \(permission denied\)"):
        resolve_model_dir(tiny_model_dir)


def test_the_report_reads_photos_as_training_does(tmp_path):
    # A large JPEG lying on its side (EXIF orientation 6) and a 16-bit grayscale PNG.
    big = tmp_path / "big.jpg"
    pixels = np.zeros((3000, 4000, 3), np.uint8)
    pixels[:, :2000] = 255  # white left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(big, exif=exif, quality=90)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(deep)
    upright, gray = _open([big, deep])
    assert min(upright.size) == TILE_SIDE and upright.height > upright.width  # decoded small, turned upright
    assert np.asarray(upright)[5, -5].mean() > 200  # the stored left half is the top-right once turned
    assert 100 < np.asarray(gray).mean() < 140  # 30000 of 65535, not clipped to white
