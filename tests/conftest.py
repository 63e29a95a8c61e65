"""Shared fixtures: one tiny model and one Ray instance for the whole session (starting Ray
costs seconds; every Ray-using test attaches to the same one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# The DreamBooth paper's photos, beside the project checkout where present (not copied in).
REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from raybooth.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_xl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline (two text encoders, micro-conditioning), as `raybooth tiny-model --family sdxl`."""
    from raybooth.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-xl", family="sdxl")


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    """The tiny model's VAE on the CPU, in fp32."""
    import torch

    from raybooth.models.loading import load_for_training

    cpu = torch.device("cpu")
    return load_for_training(tiny_model_dir, cpu, cpu, torch.float32, False).vae


@pytest.fixture
def encodings(vae):
    """The number of images in each of the VAE's encode calls, while the test runs."""
    calls, original = [], vae.encode
    vae.encode = lambda pixels: calls.append(len(pixels)) or original(pixels)
    yield calls
    vae.encode = original


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    """Subject photos: the real rc_car photos (large JPEGs of mixed sizes) when present, else
    the built-in toy car set."""
    if (REAL_PHOTOS / "rc_car").is_dir():
        return REAL_PHOTOS / "rc_car"
    from raybooth.models.tiny import write_demo_subject

    folder = tmp_path_factory.mktemp("subject")
    write_demo_subject(folder)
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raybooth.driver.cluster import connect

    connect()
    yield ray
    ray.shutdown()

