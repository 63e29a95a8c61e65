import re
from pathlib import Path

import numpy as np
import pytest
from helpers import write_solid_images
from PIL import Image

from raybooth.errors import RayboothError
from raybooth.files.images import find_images, image_files, load_image, read_rgb, to_rgb


def test_finds_the_images_sorted_and_ignores_hidden_files(tmp_path):
    paths = write_solid_images(tmp_path, (1, 2, 3), 3)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "._000.png").write_bytes(b"\0")  # macOS resource fork: hidden, not an image
    assert find_images(tmp_path, "instance images") == paths
    assert image_files(tmp_path) == paths


def test_missing_folder(tmp_path):
    with pytest.raises(RayboothError, match="instance images folder .*nope does not exist"):
        find_images(tmp_path / "nope", "instance images")
    assert find_images(tmp_path / "nope", "class images", may_be_empty=True) == []


def test_empty_folder(tmp_path):
    with pytest.raises(RayboothError, match="holds no images"):
        find_images(tmp_path, "instance images")
    assert find_images(tmp_path, "class images", may_be_empty=True) == []


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    write_solid_images(tmp_path, (1, 2, 3), 2)
    (tmp_path / "notes.txt").write_text("my dog")
    with pytest.raises(RayboothError, match="not images: notes.txt"):
        find_images(tmp_path, "instance images")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_is_named(tmp_path, damage):
    write_solid_images(tmp_path, (1, 2, 3), 2)
    broken = tmp_path / "broken.jpg"
    if damage == "garbage":
        broken.write_bytes(b"this is no jpeg")
    else:
        Image.effect_noise((256, 256), 50).convert("RGB").save(broken, quality=95)
        broken.write_bytes(broken.read_bytes()[:2000])
    with pytest.raises(RayboothError, match="broken.jpg is not a readable image"):
        find_images(tmp_path, "instance images")


def test_images_changed_on_the_way_in_are_named_in_a_warning(tmp_path, capsys):
    Image.new("RGBA", (600, 600), (255, 0, 0, 128)).save(tmp_path / "cutout.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "small.jpg")
    Image.new("RGB", (800, 600)).save(tmp_path / "fine.jpg")
    assert len(find_images(tmp_path, "instance images", resolution=512)) == 3
    warnings = capsys.readouterr().err
    assert re.search(r"cutout.png has transparency; it is flattened onto white", warnings)
    assert re.search(r"small.jpg is 300x200, smaller than the training resolution of 512 px", warnings)
    assert "fine.jpg" not in warnings and "cutout.png is" not in warnings


def test_an_unreadable_folder_is_one_clear_error(tmp_path, monkeypatch):
    # CI runs as root, which reads any folder: the refusal is simulated.
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(RayboothError, match="instance images folder .* cannot be read"):
        find_images(tmp_path, "instance images")


def test_every_mode_becomes_8_bit_rgb_without_clipping_or_losing_the_picture():
    gray16 = Image.fromarray(np.linspace(0, 65535, 64 * 80).reshape(64, 80).astype(np.uint16))
    assert gray16.mode == "I;16"
    assert abs(np.asarray(to_rgb(gray16)).mean() - 127.5) < 1  # not clipped to white as PIL's convert does
    assert np.asarray(to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 255))))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(to_rgb(Image.new("CMYK", (4, 4), (0, 255, 0, 0))))[0, 0].tolist() == [255, 0, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(Image.new("L", (4, 4), 7)).mode == "RGB"


def test_read_rgb_reads_a_whole_photo_as_training_does(tmp_path):
    Image.fromarray(np.linspace(0, 65535, 64 * 80).reshape(64, 80).astype(np.uint16)).save(tmp_path / "gray16.png")
    gray = read_rgb(tmp_path / "gray16.png")
    assert gray.shape == (64, 80, 3) and gray.dtype == np.uint8 and abs(gray.mean() - 127.5) < 1
    rotated = Image.new("RGB", (80, 64), (10, 200, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to stand upright
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_rgb(tmp_path / "rotated.jpg").shape == (80, 64, 3)


def test_a_huge_photo_is_named_and_read_small(tmp_path, capsys):
    Image.new("RGB", (10000, 10000), (200, 30, 40)).save(tmp_path / "huge.jpg", quality=80)
    assert find_images(tmp_path, "instance images", resolution=512) == [tmp_path / "huge.jpg"]
    assert re.search(r"huge.jpg is 10000x10000, an unusually large image", capsys.readouterr().err)
    image = load_image(tmp_path / "huge.jpg", 512)  # from a 1/8-scale decode, not 300 MB of pixels
    assert image.shape == (512, 512, 3) and abs(int(image[100, 100, 0]) - 200) < 8
