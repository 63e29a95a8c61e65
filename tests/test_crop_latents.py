import torch
from helpers import photo_set, ramps

from raybooth.train.crop_latents import Crop, CropLatents, normalize
from raybooth.train.loss import latent_distribution


def test_each_crop_is_encoded_once_and_given_back_in_the_order_asked(vae, encodings):
    photo = torch.from_numpy(ramps(1, 70)[0]).permute(2, 0, 1).contiguous()
    crops = CropLatents(vae, lambda asked: [photo[:, crop.top:crop.top + 64, crop.left:crop.left + 64] for crop in asked])
    a, b = Crop(0, 0, 1, False), Crop(0, 0, 5, False)
    crops.encode_new([a, a])
    assert encodings == [1] and list(crops.kept) == [a]
    mean, std = crops.of([b, a, b])
    assert encodings == [1, 1]  # b alone: a was kept
    expected_mean, expected_std = latent_distribution(vae, normalize(torch.stack([photo[:, :, 5:69], photo[:, :, 1:65]])))
    torch.testing.assert_close(mean, expected_mean[[0, 1, 0]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, expected_std[[0, 1, 0]], atol=1e-5, rtol=1e-4)


def test_a_run_that_draws_each_crop_twice_encodes_them_all_before_its_first_step(vae, encodings):
    said = []
    images = photo_set()
    images.encode_ahead(vae, steps=20, say=said.append)  # 40 draws, 20 crops
    assert "encoding the photos' 20 possible crops once, before the first step" in said[-1]
    assert set(images.crop_latents.kept) == set(images.all_crops()) and len(images.all_crops()) == 20
    assert encodings == [2, 16, 4]  # the class images, then every crop 16 at a time
    reference = photo_set()
    reference.cache_class_latents(vae)
    for (_, _, known), (_, _, pixels) in zip(images.batches(10, 20), reference.batches(10, 20)):
        mean, std = latent_distribution(vae, pixels.pixels)
        torch.testing.assert_close(known.latent_mean[:2], mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(known.latent_std[:2], std, atol=1e-5, rtol=1e-4)
    assert len(encodings) == 3 + 1 + 20  # the reference's class images and its steps; none more for the kept crops

    fewer = photo_set()
    fewer.encode_ahead(vae, steps=19, say=said.append)  # 38 draws: each crop drawn when first needed
    assert "encoded once, when first drawn" in said[-1] and not fewer.crop_latents.kept


def test_the_next_steps_new_crops_are_encoded_before_this_step_is_given(vae, encodings):
    images = photo_set(random_flip=False)
    images.encode_ahead(vae, steps=1, say=lambda line: None)
    kept_when_given = []
    for _, _, batch in images.batches(1, 2):
        kept_when_given.append(set(images.crop_latents.kept))
    drawn = photo_set(random_flip=False)  # the same draws, each step's crops read from its pixels
    drawn.cache_class_latents(vae)
    steps = [{crop_of(row) for row in batch.pixels} for _, _, batch in drawn.batches(1, 2)]
    first, second = ({(crop.image, crop.left) for crop in kept} for kept in kept_when_given)
    assert first == steps[0] | steps[1] and second == first  # step 2's crops were kept when step 1 was given


def crop_of(pixels: torch.Tensor) -> tuple[int, int]:
    """(photo, left) of a crop of `ramps`: photo k rises by k + 1 a column."""
    start, next_column = (round((value.item() + 1) * 127.5) for value in pixels[0, 0, :2])
    slope = next_column - start
    return slope - 1, start // slope
