"""The world model's pretraining, run at toy scale on CPU: it writes a pipeline folder that
diffusers and raybooth both load, with unit-variance latents and no Ray anywhere in sight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.errors import RayboothError
from raybooth.world.pretrain import SAMPLES_FILE, SETTINGS_FILE, grid_prompts, main
from raybooth.world.pretrain_stages import Progress, StageSettings, unit_variance_scale
from raybooth.world.pretraining_data import CAPTION_VARIANTS, caption_table, render_dataset
from raybooth.world.scenes import pretraining_scenes, render


@pytest.fixture
def one_thread():
    """Two intra-op threads on a busy two-core machine spin against each other; one is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("world") / "model"
    try:
        main(["--output_dir", str(output), "--device", "cpu", "--num_scenes", "16", "--workers", "1",
              "--vae_steps", "2", "--vae_batch_size", "2", "--unet_steps", "2", "--batch_size", "2",
              "--sample_steps", "1", "--samples_per_prompt", "1"])
    finally:
        torch.set_num_threads(threads)
    return output


def test_pretraining_writes_a_pipeline_folder_with_notes_and_samples(pretrained):
    assert (pretrained / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder"):
        weights = list((pretrained / part).glob("*.safetensors"))
        assert weights, part
        from safetensors.torch import load_file

        assert {tensor.dtype for tensor in load_file(weights[0]).values()} == {torch.float16}, part
    settings = json.loads((pretrained / SETTINGS_FILE).read_text())
    assert settings["vae"]["steps"] == 2 and settings["unet"]["steps"] == 2
    readme = (pretrained / "README.md").read_text()
    assert "python -m raybooth.world.pretrain" in readme and "--unet_steps 2" in readme
    grid = Image.open(pretrained / SAMPLES_FILE)
    assert grid.size == (64, 64 * len(grid_prompts()))
    vae_config = json.loads((pretrained / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == pytest.approx(settings["scaling_factor"], rel=1e-4)
    assert sum(p.stat().st_size for p in pretrained.rglob("*") if p.is_file()) < 30e6  # ships in the wheel


def test_diffusers_loads_and_samples_the_pipeline(pretrained, one_thread):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(pretrained, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a photo of a red ball on sand", num_inference_steps=2, guidance_scale=5.0,
                      output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_raybooth_loads_the_pipeline_for_training(pretrained):
    from raybooth.models.folders import resolve_model_dir, resolve_resolution
    from raybooth.models.loading import load_for_training

    assert resolve_resolution(resolve_model_dir(pretrained), None) == 64
    models = load_for_training(pretrained, torch.device("cpu"), torch.device("cpu"), torch.float32,
                               train_text_encoder=True)
    assert models.noise_scheduler.config.prediction_type == "epsilon"
    assert models.unet.dtype == torch.float32 and models.unet.training


def test_pretraining_refuses_a_folder_holding_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RayboothError):
        main(["--output_dir", str(tmp_path), "--device", "cpu", "--num_scenes", "4"])


def test_importing_pretraining_pulls_in_no_ray():
    """The GPU machine runs pretraining from source with no Ray installed."""
    code = ("import sys, raybooth.world.pretrain, raybooth.world.pretrain_stages, raybooth.world.pipeline; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_rendered_dataset_matches_render_in_order_with_a_pool():
    scenes = pretraining_scenes(np.random.default_rng(0), 300)
    images = render_dataset(scenes, workers=2)
    assert images.shape == (300, 64, 64, 3)
    assert all(np.array_equal(images[i], render(scenes[i])) for i in (0, 150, 299))


def test_caption_table_covers_every_variant_and_the_empty_prompt():
    from raybooth.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    scenes = pretraining_scenes(np.random.default_rng(0), 50)
    table = caption_table(scenes, tokenizer)
    assert table.rows.shape == (50, len(CAPTION_VARIANTS))
    decoded = tokenizer.batch_decode(table.token_ids[table.rows[0]], skip_special_tokens=True)
    assert decoded[-1] == "" and scenes[0].color in decoded[0] and scenes[0].object_class in decoded[3]
    drawn = table.sample(torch.zeros(2000, dtype=torch.long), torch.Generator().manual_seed(0))
    empty_share = (drawn == table.token_ids[0]).all(dim=1).float().mean()
    assert 0.07 < empty_share < 0.13  # classifier-free guidance's 10% dropout


def test_progress_stops_at_steps_or_time_and_decays_the_learning_rate():
    progress = Progress(StageSettings(steps=100, batch_size=1, learning_rate=1.0, time_budget_s=1e6, warmup_steps=10))
    assert progress.learning_rate(0) == pytest.approx(0.1, rel=0.01)  # warming up
    assert progress.learning_rate(10) > 0.95  # warmed up, barely decayed
    assert progress.learning_rate(50) == pytest.approx(0.55, rel=0.01)
    assert progress.learning_rate(100) == pytest.approx(0.1, rel=0.01)
    assert Progress(StageSettings(100, 1, 1.0, time_budget_s=0.0)).fraction(0) >= 1


def test_scale_gives_unit_variance_latents():
    means = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    stds = torch.full_like(means, 0.5)
    scale = unit_variance_scale(means, stds, torch.Generator().manual_seed(0))
    assert scale == pytest.approx(1 / (9 + 0.25) ** 0.5, rel=0.05)


def test_model_dir_finds_the_shipped_pipeline_or_says_how_to_make_one(tmp_path, monkeypatch):
    import raybooth.world as world

    monkeypatch.setattr(world, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(RayboothError, match="raybooth.world.pretrain"):
        world.model_dir()
    (tmp_path / world.PIPELINE).mkdir()
    (tmp_path / world.PIPELINE / "model_index.json").write_text("{}")
    assert world.model_dir() == tmp_path / world.PIPELINE


def test_the_shipped_world_pipeline_draws_each_class_as_the_classifier_knows_it():
    """The weights in the package are pretrained: class prompts give members of their class."""
    from diffusers import StableDiffusionPipeline

    from raybooth.world import model_dir
    from raybooth.world.classifier import load_classifier
    from raybooth.world.scenes import CLASSES

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir(), torch_dtype=torch.float32, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline([f"a photo of a {name}" for name in CLASSES for _ in range(2)], num_inference_steps=20,
                      guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images
    predicted = load_classifier().predict((images * 255).round().astype(np.uint8))
    expected = [CLASSES.index(name) for name in CLASSES for _ in range(2)]
    assert (predicted["class"] == np.array(expected)).mean() >= 0.75, predicted["class"]
    assert not predicted["subject"].any()  # the subject is held out of pretraining


def test_the_shipped_autoencoder_keeps_the_subject_and_colours_outside_the_world():
    """The VAE saw any colour and chequered objects (never the subject's own pair): the subject's
    photos survive encoding and decoding, as they must for fine-tuning to be able to show it."""
    from diffusers import AutoencoderKL

    from raybooth.world import model_dir
    from raybooth.world.classifier import load_classifier
    from raybooth.world.scenes import BACKGROUNDS, subject_scene

    rng = np.random.default_rng(1)
    photos = np.stack([render(subject_scene(rng, background)) for background in BACKGROUNDS * 2])
    vae = AutoencoderKL.from_pretrained(model_dir(), subfolder="vae", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert load_classifier().predict(list(decoded))["subject"].mean() >= 0.9
    assert np.abs(decoded.astype(float) - photos).mean() < 12  # the picture, not only the label
