"""SDXL, raybooth's second model family, on a tiny SDXL pipeline built from configs: its prompts
are encoded and its rows micro-conditioned as diffusers' SDXL pipeline and script do, and every
command (train full and LoRA, on two workers too; resume; generate; merge-lora; run) works on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers import INSTANCE_PROMPT, differs, train_args, weights
from safetensors import safe_open

from raybooth.commands.cli import main
from raybooth.models.families import STABLE_DIFFUSION_XL
from raybooth.models.folders import model_family, resolve_resolution
from raybooth.models.loading import load_for_training, load_tokenizers, prompt_ids
from raybooth.train.batches import TrainingSet
from raybooth.train.crop_latents import Crop

CPU = torch.device("cpu")


def xl_pipeline(folder) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_an_sdxl_folder_is_told_by_its_index_and_works_at_its_native_size(tiny_xl_dir):
    assert model_family(tiny_xl_dir) is STABLE_DIFFUSION_XL
    assert resolve_resolution(tiny_xl_dir, None) == 64  # the UNet's sample size (16) times the VAE's scale (4)


def test_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(tiny_xl_dir):
    models = load_for_training(tiny_xl_dir, CPU, CPU, torch.float32, train_text_encoder=False)
    ids = torch.from_numpy(prompt_ids(load_tokenizers(tiny_xl_dir), INSTANCE_PROMPT)).unsqueeze(0)
    assert ids.shape == (1, 2, 77)  # both tokenizers'
    with torch.no_grad():
        hidden, pooled = models.encode_prompts(ids)
        expected, _, expected_pooled, _ = xl_pipeline(tiny_xl_dir).encode_prompt(
            INSTANCE_PROMPT, device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)


def test_each_row_is_micro_conditioned_on_its_photos_size_and_crop():
    """time_ids as diffusers' SDXL script has them: the photo's size before resizing, and the corner
    of the crop in the resized photo after its flip: the pixels the row shows are that crop's."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)  # as read: shorter side 64, from 480 x 720
    classes = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    ids = np.zeros(4, dtype=np.int64)
    training_set = TrainingSet([photo], classes, 64, [(0, 0)], 1, ids, ids, CPU, 0, random_flip=True,
                               original_sizes=[(480, 720)])
    for crop in (Crop(0, 0, 10, False), Crop(0, 0, 10, True)):
        draw = training_set.draw([(0, 0)])._replace(crops=[crop])
        batch = training_set.batch(draw)
        height, width, top, left, *target = batch.time_ids[0].tolist()
        assert (height, width, target) == (480, 720, [64, 64])
        upright = np.flip(photo, axis=1) if crop.flipped else photo  # the script flips, then crops
        expected = upright[int(top):int(top) + 64, int(left):int(left) + 64]
        shown = ((batch.pixels[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(shown, expected)
        assert batch.time_ids[1].tolist() == [64, 64, 0, 0, 64, 64]  # the class image, whole
    # SD has no micro-conditioning: no time_ids at all.
    plain = TrainingSet([photo], classes, 64, [(0, 0)], 1, ids, ids, CPU, 0)
    assert plain.batch(plain.draw([(0, 0)])).time_ids is None


def test_full_fine_tuning_on_two_workers_writes_an_sdxl_pipeline_that_diffusers_samples(
        ray_cluster, tiny_xl_dir, subject_dir, tmp_path, capsys):
    output = tmp_path / "tuned"
    assert main(train_args(tiny_xl_dir, output, subject_dir, tmp_path / "class", "--num_workers", "2",
                           "--no_use_gpu", "--train_batch_size", "2", "--num_epochs", "2", "--lr", "1e-4")) == 0
    assert "2 worker(s) on CPU\n" in capsys.readouterr().err
    log = json.loads((output / "training_log.json").read_text())
    assert log["world_size"] == 2 and all(np.isfinite(row["loss"]) for row in log["history"])
    for part in ("unet", "text_encoder", "text_encoder_2"):  # --train_text_encoder trains both encoders
        assert differs(weights(output, part), weights(tiny_xl_dir, part)), part
    assert not differs(weights(output, "vae"), weights(tiny_xl_dir, "vae"))
    image = xl_pipeline(output)(INSTANCE_PROMPT, num_inference_steps=2, output_type="np",
                                generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_lora_trains_adapters_on_the_unet_and_both_encoders_that_diffusers_loads(
        ray_cluster, tiny_xl_dir, subject_dir, tmp_path):
    lora = tmp_path / "lora"
    assert main(train_args(tiny_xl_dir, lora, subject_dir, tmp_path / "class", "--use_lora", "--no_use_gpu",
                           "--max_train_steps", "6", "--lr", "1e-3")) == 0
    with safe_open(lora / "pytorch_lora_weights.safetensors", "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    parts = {key.split(".")[0] for key in tensors}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}
    for part in parts:  # the up matrices start at zero: each part's moved
        assert any(value.abs().max() > 0 for key, value in tensors.items()
                   if key.startswith(f"{part}.") and ("lora.up" in key or "lora_B" in key or "up.weight" in key)), part

    # merge-lora writes the pipeline diffusers itself makes of base + adapter, weight for weight.
    merged = tmp_path / "merged"
    assert main(["merge-lora", "--model_dir", str(tiny_xl_dir), "--lora_weights_dir", str(lora),
                 "--output_dir", str(merged)]) == 0
    by_diffusers = xl_pipeline(tiny_xl_dir)
    by_diffusers.load_lora_weights(lora)
    by_diffusers.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    by_diffusers.unload_lora_weights()
    ours = xl_pipeline(merged)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        theirs = getattr(by_diffusers, part).state_dict()
        for name, tensor in getattr(ours, part).state_dict().items():
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=f"{part}.{name}")

    # generate with the adapter gives the merged model's image.
    for model, extra, folder in ((tiny_xl_dir, ["--lora_weights_dir", str(lora)], "applied"),
                                 (merged, [], "from-merged")):
        assert main(["generate", "--model_dir", str(model), *extra, "--output_dir", str(tmp_path / folder),
                     "--prompts", INSTANCE_PROMPT, "--num_inference_steps", "2", "--no_use_gpu"]) == 0
    images = [np.asarray(next((tmp_path / folder).glob("*.png")).read_bytes()) for folder in ("applied", "from-merged")]
    assert images[0].tobytes() == images[1].tobytes()


def test_a_run_on_an_sdxl_model_learns_and_samples(ray_cluster, tiny_xl_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # As tests/test_workflow.py trains the tiny SD model: hard enough for the loss to fall in a minute.
    assert main(["run", "--model_dir", str(tiny_xl_dir), "--num_class_images", "16", "--num_epochs", "6",
                 "--train_batch_size", "2", "--lr", "1e-3", "--num_inference_steps", "4",
                 "--num_samples_per_prompt", "1", "--report_every_n_steps", "8"]) == 0
    work = tmp_path / "raybooth-run"
    xl_pipeline(work / "model-tuned")
    history = json.loads((work / "model-tuned" / "training_log.json").read_text())["history"]
    first, last = (np.mean([row["loss"] for row in rows]) for rows in (history[:8], history[-8:]))
    assert last < 0.7 * first, (first, last)
    assert len(list((work / "images-new").glob("*.png"))) == 3


@pytest.mark.parametrize("pipeline_class", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"])
def test_other_sdxl_pipelines_are_refused_in_one_line(tiny_xl_dir, tmp_path, pipeline_class, capsys):
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_xl_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": pipeline_class}))
    assert main(["generate", "--model_dir", str(folder), "--prompts", "a toy car", "--output_dir",
                 str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and pipeline_class in error[0] and "Stable Diffusion XL" in error[0]


def test_a_vae_of_its_own_trains_samples_and_ships_with_a_full_fine_tune(ray_cluster, tiny_xl_dir, subject_dir,
                                                                         tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_xl_dir, subfolder="vae")
    with torch.no_grad():  # another VAE, as the fp16-fixed one is another SDXL VAE
        for parameter in vae.parameters():
            parameter.mul_(0.9)
    vae.save_pretrained(tmp_path / "own-vae")
    output = tmp_path / "tuned"
    assert main(train_args(tiny_xl_dir, output, subject_dir, tmp_path / "class", "--no_use_gpu", "--max_train_steps",
                           "2", "--pretrained_vae_model_name_or_path", str(tmp_path / "own-vae"))) == 0
    assert not differs(weights(output, "vae"), weights(tmp_path / "own-vae", ""))
    assert differs(weights(output, "vae"), weights(tiny_xl_dir, "vae"))

    # Not a VAE: one line, before Ray.
    capsys.readouterr()
    assert main(train_args(tiny_xl_dir, tmp_path / "other", subject_dir, tmp_path / "class", "--no_use_gpu",
                           "--pretrained_vae_model_name_or_path", str(tiny_xl_dir / "unet"))) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not a VAE" in error[0] and "UNet2DConditionModel" in error[0]
