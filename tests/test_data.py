import numpy as np
from helpers import write_solid_images
from PIL import Image

from raybooth.driver.datasets import image_dataset
from raybooth.files.images import load_image, read_images, resize_shorter_side
from raybooth.models.loading import load_tokenizer, tokenize
from raybooth.train.data import read_all


def test_shorter_side_is_resized_keeping_the_aspect_ratio():
    assert resize_shorter_side(Image.new("RGB", (300, 200)), 64).size == (96, 64)
    assert resize_shorter_side(Image.new("RGB", (200, 600)), 64).size == (64, 192)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    upright_photo = np.zeros((120, 80, 3), np.uint8)
    upright_photo[:20] = 255  # white at the top
    stored = Image.fromarray(upright_photo).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg", 64)
    assert image.shape == (96, 64, 3)  # portrait again
    assert image[:10].mean() > 200 and image[-30:].mean() < 50


def test_a_large_jpeg_is_decoded_small_and_every_mode_becomes_rgb(tmp_path):
    Image.new("RGB", (4000, 3000), (200, 30, 40)).save(tmp_path / "big.jpg", quality=90)
    image = load_image(tmp_path / "big.jpg", 512)
    assert image.shape == (512, 683, 3) and image.dtype == np.uint8
    assert abs(int(image[256, 300, 0]) - 200) < 8
    Image.fromarray(np.full((64, 80), 40000, np.uint16)).save(tmp_path / "gray16.png")  # a 16-bit scan
    assert abs(int(load_image(tmp_path / "gray16.png", 64)[10, 10, 0]) - 40000 * 255 // 65535) <= 1
    for mode, color in (("L", 128), ("P", 3), ("RGBA", (10, 20, 30, 255))):
        Image.new(mode, (80, 64), color).save(tmp_path / f"{mode}.png")
        assert load_image(tmp_path / f"{mode}.png", 64).shape == (64, 80, 3)


def test_image_dataset_reads_every_image_resized(ray_cluster, tmp_path):
    paths = write_solid_images(tmp_path / "a", (255, 0, 0), 3, size=(128, 96)) + \
        write_solid_images(tmp_path / "b", (0, 0, 255), 2, size=(64, 64))
    images = read_all(image_dataset(paths, 32, parallelism=2).iterator())
    assert sorted(images) == sorted(str(p) for p in paths)
    assert images[str(paths[0])].shape == (32, 43, 3) and images[str(paths[0])][0, 0].tolist() == [255, 0, 0]
    assert images[str(paths[-1])].shape == (32, 32, 3) and images[str(paths[-1])][0, 0].tolist() == [0, 0, 255]
    # Local mode's read in the command's own threads gives the same arrays.
    own = read_images([str(p) for p in paths], 32, threads=3)
    assert list(own) == [str(p) for p in paths]  # in the order asked
    assert all(np.array_equal(own[path], images[path]) for path in own)


def test_prompts_are_padded_to_the_full_context(tiny_model_dir):
    ids = tokenize(load_tokenizer(tiny_model_dir), "a photo of unqtkn toy car")
    assert ids.shape == (77,) and ids.dtype == np.int64
