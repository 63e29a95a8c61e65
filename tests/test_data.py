from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.data import (build_train_dataset, crop_and_tokenize, join_instance_and_class, pair_images, partners,
                           random_crop, read_resized, resize_shorter_side, to_pixels, tokenize)
from raybooth.images import ORIENTATION_TAG, find_images
from raybooth.models import load_tokenizer

from conftest import write_solid_images


def test_real_photos_are_resized_on_the_shorter_side_then_cropped_square(subject_dir):
    rng = np.random.default_rng(0)
    for path in find_images(subject_dir, "subject"):
        photo = np.asarray(Image.open(path).convert("RGB"))
        resized = resize_shorter_side(photo, 64)
        assert min(resized.shape[:2]) == 64
        # The aspect ratio survives (to the pixel): nothing is squashed.
        assert resized.shape[1] / resized.shape[0] == pytest.approx(photo.shape[1] / photo.shape[0], abs=0.02)
        crop = random_crop(resized, 64, rng)
        assert crop.shape == (64, 64, 3)
        pixels = to_pixels(crop)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
        assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0  # real photos span the range


def test_photos_are_turned_upright_by_their_exif_orientation(ray_cluster, tmp_path):
    # A portrait photo stored landscape, with the tag a phone writes for "rotate 90 degrees".
    upright_photo = np.zeros((120, 80, 3), np.uint8)
    upright_photo[:20] = 255  # white at the top
    stored = Image.fromarray(upright_photo).transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[ORIENTATION_TAG] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    (row,) = read_resized([tmp_path / "phone.jpg"], 64).take_all()
    assert row["image"].shape == (96, 64, 3)  # portrait again, shorter side 64
    assert row["image"][:10].mean() > 200 and row["image"][-40:].mean() < 30  # and the white is on top


def test_crops_are_random_and_inside_the_image():
    image = np.arange(80 * 64 * 3, dtype=np.int64).reshape(64, 80, 3)
    crops = {random_crop(image, 64, np.random.default_rng(seed))[0, 0, 0] for seed in range(20)}
    assert len(crops) > 3  # different offsets
    assert all(c in image[0, :17, 0] for c in crops)


def test_normalization_maps_0_and_255_to_minus_one_and_one():
    image = np.array([[[0, 255, 127]]], dtype=np.uint8)
    np.testing.assert_allclose(to_pixels(image)[:, 0, 0], [-1.0, 1.0, 127 / 127.5 - 1], rtol=1e-6)


def test_prompt_ids_span_the_full_context(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenize(tokenizer, "a photo of unqtkn toy car")
    assert ids.shape == (77,) and ids.dtype == np.int64
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of unqtkn toy car"
    assert (ids[len("a photo of unqtkn toy car") + 1:] == tokenizer.pad_token_id).all()
    assert not np.array_equal(ids, tokenize(tokenizer, "a photo of a toy car"))


def test_partners_repeat_the_smaller_set_evenly(tmp_path):
    instances = [tmp_path / f"i{k}.jpg" for k in range(5)]
    classes = [tmp_path / f"c{k}.png" for k in range(12)]
    pairing = partners(instances, classes)
    assert all(len(p) == 1 for p in pairing.values())  # each class image once
    counts = Counter(i for p in pairing.values() for i in p)
    assert sorted(counts) == list(range(5)) and max(counts.values()) - min(counts.values()) <= 1
    # More instance than class images: class images repeat instead, and every photo is used.
    pairing = partners(instances, classes[:2])
    assert sorted(i for p in pairing.values() for i in p) == list(range(5))


def test_a_batch_keeps_each_image_with_its_own_prompt_ids():
    # Four rows, each image and each prompt marked with its row number.
    batch = {f"{role}_{part}": None for role in ("instance", "class") for part in ("pixels", "prompt_ids")}
    rows = torch.arange(4)
    batch["instance_pixels"] = rows.float().reshape(4, 1, 1, 1).expand(4, 3, 8, 8)
    batch["class_pixels"] = (rows.float() + 10).reshape(4, 1, 1, 1).expand(4, 3, 8, 8)
    batch["instance_prompt_ids"] = rows.reshape(4, 1).expand(4, 77)
    batch["class_prompt_ids"] = (rows + 10).reshape(4, 1).expand(4, 77)
    pixels, prompt_ids = join_instance_and_class(batch)
    assert pixels.shape == (8, 3, 8, 8) and prompt_ids.shape == (8, 77)
    for row in range(8):
        assert pixels[row, 0, 0, 0].item() == prompt_ids[row, 0].item()
    assert pixels[:4, 0, 0, 0].tolist() == [0, 1, 2, 3]  # instance half first, as the loss expects


def test_crop_and_tokenize_gives_each_row_its_role_and_ids():
    batch = {"instance_image": [np.zeros((70, 64, 3), np.uint8)] * 3, "class_image": [np.full((64, 90, 3), 255, np.uint8)] * 3}
    out = crop_and_tokenize(batch, 64, np.array([1, 2, 3]), np.array([4, 5, 6]))
    assert out["instance_pixels"].shape == (3, 3, 64, 64) and (out["instance_pixels"] == -1).all()
    assert (out["class_pixels"] == 1).all()
    assert out["instance_prompt_ids"].tolist() == [[1, 2, 3]] * 3 and out["class_prompt_ids"].tolist() == [[4, 5, 6]] * 3


def test_ray_pipeline_pairs_every_instance_image_evenly_with_class_images(ray_cluster, tmp_path, subject_dir):
    instance_paths = find_images(subject_dir, "instance")  # large real JPEGs where present
    class_paths = write_solid_images(tmp_path / "class", (0, 0, 255), 12)
    rows = pair_images(instance_paths, class_paths, 64).take_all()
    assert len(rows) == 12
    assert all(min(r["instance_image"].shape[:2]) == 64 for r in rows)
    assert all(r["class_image"].shape == (64, 80, 3) for r in rows)
    uses = Counter(r["instance_image"].tobytes() for r in rows)
    assert len(uses) == len(instance_paths) and max(uses.values()) - min(uses.values()) <= 1


def test_ray_batches_pair_instance_and_class_examples_with_their_prompts(ray_cluster, tmp_path, tiny_model_dir):
    instance_paths = write_solid_images(tmp_path / "instance", (255, 0, 0), 3, size=(96, 64))
    class_paths = write_solid_images(tmp_path / "class", (0, 0, 255), 7, size=(64, 120))
    tokenizer = load_tokenizer(tiny_model_dir)
    instance_ids, class_ids = tokenize(tokenizer, "a photo of unqtkn toy car"), tokenize(tokenizer, "a photo of a toy car")
    dataset = build_train_dataset(instance_paths, class_paths, instance_ids, class_ids, 64)
    seen = 0
    for batch in dataset.iter_torch_batches(batch_size=3):
        pixels, prompt_ids = join_instance_and_class(batch)
        for image, ids in zip(pixels, prompt_ids):
            red = image[0].mean() > 0.9 and image[2].mean() < -0.9
            blue = image[2].mean() > 0.9 and image[0].mean() < -0.9
            assert red or blue
            expected = instance_ids if red else class_ids
            assert ids.tolist() == expected.tolist()
        assert pixels.shape[1:] == (3, 64, 64)
        seen += len(pixels) // 2
    assert seen == 7
