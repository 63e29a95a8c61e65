import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from raybooth.models.folders import resolve_model_dir, resolve_resolution
from raybooth.models.tiny import build_tokenizer, write_demo_subject


def test_the_tiny_model_loads_in_diffusers_and_generates(tiny_model_dir):
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir
    assert resolve_resolution(tiny_model_dir, None) == 64
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of a toy car", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0


def test_the_tokenizer_is_built_offline_and_tokenizes_like_clip():
    tokenizer = build_tokenizer()
    ids = tokenizer("a photo of unqtkn toy car").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids[1:-1])
    assert "".join(tokens).replace("</w>", " ").strip() == "a photo of unqtkn toy car"
    assert tokenizer.model_max_length == 77


def test_demo_subject_photos_are_one_red_car_in_different_scenes(tmp_path):
    paths = write_demo_subject(tmp_path, count=4)
    images = [np.asarray(Image.open(p)) for p in paths]
    assert len(paths) == 4 and all(min(im.shape[:2]) >= 96 for im in images)
    red = [((im[..., 0] > 150) & (im[..., 1] < 60) & (im[..., 2] < 60)).mean() for im in images]
    assert all(r > 0.03 for r in red)  # the car is in every photo
    assert len({im.tobytes() for im in images}) == 4  # four different scenes
