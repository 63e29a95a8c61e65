import pytest
from PIL import Image

from raybooth.errors import RayboothError
from raybooth.images import find_images, image_files

from conftest import write_solid_images


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
