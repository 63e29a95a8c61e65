import numpy as np
import pytest
import torch
from helpers import photo_set, ramps, solid

from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.loss import latent_distribution

CPU = torch.device("cpu")


def training_set(instances, classes, pairs=None, batch_size=2, resolution=64, seed=0) -> TrainingSet:
    pairs = pairs or pairing(len(instances), len(classes), max(len(instances), len(classes)), 0, 1)
    return TrainingSet(instances, classes, resolution, pairs, batch_size, np.array([1, 2, 3]), np.array([4, 5, 6]),
                       CPU, seed)


def test_pairing_uses_every_image_and_shares_photos_among_workers():
    pairs = pairing(5, 200, 200, rank=0, world_size=1)
    assert [sum(i == k for i, _ in pairs) for k in range(5)] == [40] * 5
    assert sorted(c for _, c in pairs) == list(range(200))
    shares = [pairing(4, 100, 100, rank, 2) for rank in range(2)]
    assert {i for i, _ in shares[0]} == {0, 2} and {i for i, _ in shares[1]} == {1, 3}
    assert pairing(5, 2, 5, 0, 1) == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]


def test_steps_count_across_epochs_and_stop_at_max_steps():
    images = training_set([solid(0)] * 3, [solid(255)] * 6, batch_size=2)  # 6 pairs: 3 steps an epoch
    steps = [(step, epoch) for step, epoch, _ in images.batches(num_epochs=4, max_steps=7)]
    assert steps == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2)]
    assert len(list(images.batches(num_epochs=2, max_steps=100))) == 6


def test_each_batch_has_one_shape_instance_rows_first_then_class_rows():
    # 5 pairs in batches of 2: the last batch of an epoch is topped up, never short.
    images = training_set([solid(0, 80, 96)] * 5, [solid(255, 64, 90)] * 2, batch_size=2)
    batches = [batch for _, _, batch in images.batches(num_epochs=2, max_steps=100)]
    assert len(batches) == 6
    for batch in batches:
        assert batch.pixels.shape == (4, 3, 64, 64) and batch.latent_mean is None
        assert torch.all(batch.pixels[:2] == -1) and torch.all(batch.pixels[2:] == 1)  # black photos, white classes
        assert batch.prompt_ids.tolist() == [[1, 2, 3]] * 2 + [[4, 5, 6]] * 2


def test_drawing_a_step_ahead_takes_the_random_numbers_in_the_order_of_drawing_each_step_as_it_comes():
    images = training_set([ramps(1, 160)[0]], [solid(9)], pairs=[(0, 0)] * 3, batch_size=1, seed=5)
    lefts = [round((batch.pixels[0, 0, 0, 0].item() + 1) * 127.5) for _, _, batch in images.batches(3, 100)]
    rng, expected = np.random.default_rng(5), []
    for _ in range(3):  # each epoch: its order, then each pair's crop (one top for a 64-high photo, then a left)
        rng.permutation(3)
        expected += [(rng.integers(0, 1), rng.integers(0, 160 - 64 + 1))[1] for _ in range(3)]
    assert lefts == expected


def test_crops_are_random_and_differ_between_epochs():
    gradient = ramps(1, 160)[0]  # a left-to-right ramp, 0 to 159
    images = training_set([gradient], [solid(9)], batch_size=1)
    lefts = {batch.pixels[0, 0, 0, 0].item() for _, _, batch in images.batches(num_epochs=20, max_steps=100)}
    assert len(lefts) > 5


def test_class_latents_are_cached_when_class_images_are_at_the_resolution(vae):
    classes = [solid(40), solid(200)]
    images = training_set([solid(0, 64, 80)], classes, batch_size=2)
    assert images.cache_class_latents(vae)
    pixels = torch.from_numpy(np.stack(classes)).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
    mean, std = latent_distribution(vae, pixels)
    torch.testing.assert_close(images.class_latents[0], mean)
    torch.testing.assert_close(images.class_latents[1], std)
    (_, _, batch), = images.batches(num_epochs=1, max_steps=1)
    assert batch.pixels.shape == (2, 3, 64, 64)  # instance crops only
    assert batch.latent_mean.shape == batch.latent_std.shape == (2, *mean.shape[1:])


def test_class_images_of_another_size_are_cropped_each_step_instead(vae):
    images = training_set([solid(0)], [solid(9, 64, 100)])
    assert not images.cache_class_latents(vae) and images.class_latents is None


def test_each_crop_is_encoded_once_and_gives_the_latents_that_encoding_it_each_step_gives(vae, encodings):
    """Remembered crops: the same crops drawn in the same order as a set that encodes them in each
    step; each distinct crop encoded once, the first time it is drawn; then no encoding at all."""
    remembering, encoding = photo_set(), photo_set()
    remembering.cache_class_latents(vae)
    encoding.cache_class_latents(vae)
    assert remembering.remember_crop_latents(vae) and remembering.distinct_crops() == 2 * 5 * 2
    assert not remembering.encodes_in_step and encoding.encodes_in_step
    encodings.clear()  # the class images'
    seen = set()
    for (_, _, known), (_, _, pixels) in zip(remembering.batches(60, 120), encoding.batches(60, 120)):
        assert known.pixels is None and known.latent_mean.shape == known.latent_std.shape == (4, 4, 16, 16)
        new = set(remembering.crop_latents.kept) - seen
        seen |= new
        assert sum(encodings) == len(seen)  # only the crops drawn for the first time (or next) were encoded
        mean, std = latent_distribution(vae, pixels.pixels)
        encodings.pop()  # the reference's encoding
        torch.testing.assert_close(known.latent_mean, torch.cat([mean, pixels.latent_mean]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(known.latent_std, torch.cat([std, pixels.latent_std]), atol=1e-5, rtol=1e-4)
    assert len(seen) == 20  # 120 steps drew every crop, each encoded once


def test_crops_are_encoded_in_the_step_without_cached_class_latents_or_past_the_memory_cap(vae):
    photos = training_set(ramps(1, 72), [solid(9, 64, 100)])
    assert not photos.cache_class_latents(vae) and not photos.remember_crop_latents(vae)
    photos = training_set(ramps(1, 72), [solid(9)])
    assert photos.cache_class_latents(vae) and photos.distinct_crops() == 9
    assert not photos.remember_crop_latents(vae, max_bytes=9 * 2 * 4 * 16 * 16 * 4 - 1)  # fp32 mean and std: a byte short
    assert photos.encodes_in_step and next(photos.batches(1, 1))[2].pixels.shape == (2, 3, 64, 64)
    assert photos.remember_crop_latents(vae, max_bytes=9 * 2 * 4 * 16 * 16 * 4)
    assert options_set(center_crop=True, random_flip=True).distinct_crops() == 2  # a crop and its mirror image


def options_set(**options) -> TrainingSet:
    gradient = ramps(1, 160)[0]  # a left-to-right ramp, 0 to 159
    return TrainingSet([gradient], [solid(9)], 64, [(0, 0)], 1, np.array([1]), np.array([2]), CPU, 0, **options)


def test_center_crop_takes_the_middle_of_each_photo_every_step():
    lefts = {batch.pixels[0, 0, 0, 0].item() for _, _, batch in options_set(center_crop=True).batches(10, 100)}
    assert len(lefts) == 1  # the same crop every step: the 48th column of a left-to-right ramp
    assert lefts.pop() == pytest.approx((160 - 64) // 2 / 127.5 - 1)


def test_random_flip_mirrors_about_half_of_the_crops():
    rows = [batch.pixels[0, 0, 0] for _, _, batch in options_set(center_crop=True, random_flip=True).batches(40, 100)]
    flipped = sum(bool(row[0] > row[-1]) for row in rows)  # the ramp runs right to left
    assert 8 < flipped < 32
    assert all(torch.equal(row, rows[0]) or torch.equal(row, rows[0].flip(0)) for row in rows)


def test_with_accumulation_a_step_is_its_micro_batches():
    images = training_set([solid(0)] * 3, [solid(255)] * 6, batch_size=2)
    images.accumulation = 2  # 6 pairs: 2 steps of 2 micro-batches of 2, the last topped up
    steps = list(images.batches(num_epochs=1, max_steps=100))
    assert [step for step, _, _ in steps] == [1, 2]
    for _, _, micro_batches in steps:
        assert [batch.pixels.shape for batch in micro_batches] == [(4, 3, 64, 64)] * 2
