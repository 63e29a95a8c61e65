import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raybooth.config import GenerateConfig
from raybooth.driver.generation import GENERATE_RAY_LOG, ImageGenerator, encode_pngs, generate
from raybooth.errors import RayboothError
from raybooth.files.images import image_files
from raybooth.files.names import generated_for, image_name, image_seed, missing_images

PROMPTS = ["a photo of a toy car", "a toy car on the beach"]


def settings(model_dir, output_dir, **overrides) -> GenerateConfig:
    return GenerateConfig(**dict(model_dir=model_dir, output_dir=output_dir, prompts=PROMPTS,
                                 num_samples_per_prompt=3, batch_size=2, num_inference_steps=3) | overrides)


def test_names_and_seeds_follow_prompt_and_index_alone():
    assert image_name("a photo of a toy car", 7) == image_name("a photo of a toy car", 7)
    assert image_name("a photo of a toy car", 7).startswith("a-photo-of-a-toy-car-")
    assert image_name("a photo of a toy car", 7).endswith("-0007.png")
    assert image_name("A photo of a toy car", 7) != image_name("a photo of a toy car", 7)
    assert len({image_seed(0, p, i) for p in PROMPTS for i in range(50)}) == 100
    assert image_seed(1, PROMPTS[0], 0) != image_seed(0, PROMPTS[0], 0)
    assert generated_for(image_name(PROMPTS[0], 12345)) == generated_for(image_name(PROMPTS[0], 0))
    assert generated_for(image_name(PROMPTS[0], 0)) != generated_for(image_name(PROMPTS[1], 0))
    assert generated_for("IMG_0042.png") is None and generated_for("my-dog-2024-0001.jpg") is None


def test_generate_writes_n_images_per_prompt_and_resumes(ray_cluster, tiny_model_dir, tmp_path):
    output = tmp_path / "images"
    paths = generate(settings(tiny_model_dir, output))
    assert sorted(paths) == sorted(output / image_name(p, i) for p in PROMPTS for i in range(3))
    # ... and nothing else but the hidden Ray log: no partial files
    assert sorted(p for p in output.iterdir() if p.name != GENERATE_RAY_LOG) == sorted(paths)
    assert all(Image.open(p).size == (64, 64) for p in paths)
    pixels = {p: np.asarray(Image.open(p), dtype=np.int16) for p in paths}
    assert len({a.tobytes() for a in pixels.values()}) == 6  # every image its own noise

    # A re-run makes only what is missing, and makes it as the first run did.
    lost = paths[4]
    lost.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in paths if p != lost}
    assert missing_images(PROMPTS, 3, output, 0) == [dict(prompt=PROMPTS[1], index=1, seed=image_seed(0, PROMPTS[1], 1),
                                                          file=lost.name)]
    generate(settings(tiny_model_dir, output))
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert np.abs(np.asarray(Image.open(lost), dtype=np.int16) - pixels[lost]).max() <= 2

    # Asking for more per prompt adds the new indices only.
    generate(settings(tiny_model_dir, output, num_samples_per_prompt=4))
    assert len(image_files(output)) == 8


def test_local_mode_renders_in_this_process_the_images_an_actor_makes(ray_cluster, tiny_model_dir, tmp_path, capsys):
    here = generate(settings(tiny_model_dir, tmp_path / "here"))  # the default on a Ray this process started
    assert "rendering on CPU in this process (local mode), in batches of 2" in capsys.readouterr().err
    there = generate(settings(tiny_model_dir, tmp_path / "actor", local_mode=False))
    assert "rendering on CPU with 1 Ray Data actor(s), in batches of 2" in capsys.readouterr().err
    assert image_files(tmp_path / "here") == here and [path.name for path in here] == [path.name for path in there]
    for mine, theirs in zip(here, there):  # a seed gives the same image either way
        np.testing.assert_array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(theirs)))


def test_generation_is_local_where_one_actor_would_render_on_a_ray_this_command_would_start(
        tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from raybooth.driver.local_generation import local_device

    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))  # a command's start
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(settings(tiny_model_dir, tmp_path), 6) == "cpu"
    assert local_device(settings(tiny_model_dir, tmp_path, address="10.0.0.1:6379"), 6) is None  # the cluster's actors
    assert local_device(settings(tiny_model_dir, tmp_path, address="10.0.0.1:6379", local_mode=True), 6) == "cpu"
    assert local_device(settings(tiny_model_dir, tmp_path, local_mode=False), 6) is None
    assert local_device(settings(tiny_model_dir, tmp_path, num_workers=2), 6) is None  # two actors: Ray Data's
    assert local_device(settings(tiny_model_dir, tmp_path, num_workers=2), 2) == "cpu"  # but one batch in all
    with pytest.raises(RayboothError, match="--use_gpu was given but torch sees no GPU on this machine"):
        local_device(settings(tiny_model_dir, tmp_path, use_gpu=True), 6)
    with pytest.raises(RayboothError, match="--local_mode renders in this process; it does not go with --num_workers "
                                            "above 1"):
        settings(tiny_model_dir, tmp_path, local_mode=True, num_workers=2).validate()


def test_local_generation_starts_no_ray_and_writes_whole_pngs_from_processes_of_its_own(tiny_model_dir, tmp_path):
    output = tmp_path / "images"
    args = ["generate", "--model_dir", str(tiny_model_dir), "--output_dir", str(output), "--prompts", "a toy car",
            "--num_samples_per_prompt", "3", "--batch_size", "2", "--num_inference_steps", "2", "--no_use_gpu"]
    script = f"import sys; from raybooth.commands.cli import main; code = main({args!r}); print('ray' in sys.modules); sys.exit(code)"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rendering on CPU in this process (local mode), in batches of 2" in done.stderr
    assert "pipeline loaded on cpu in " in done.stderr
    assert done.stdout.split()[-1] == "False"  # Ray was not even imported
    assert sorted(path.name for path in output.iterdir()) == sorted(image_name("a toy car", i) for i in range(3))
    assert all(Image.open(path).size == (64, 64) for path in output.iterdir())


def test_bad_generate_input_fails_before_ray(tmp_path, tiny_model_dir):
    with pytest.raises(RayboothError, match="does not exist"):
        generate(settings(tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(RayboothError, match="--num_samples_per_prompt must be at least 1"):
        generate(settings(tiny_model_dir, tmp_path / "out", num_samples_per_prompt=0))
    with pytest.raises(RayboothError, match="--prompts: prompt 2 of 3 is empty"):
        generate(settings(tiny_model_dir, tmp_path / "out", prompts=["a dog", " ", "a cat"]))
    with pytest.raises(RayboothError, match="--guidance_scale must be a finite number"):
        generate(settings(tiny_model_dir, tmp_path / "out", guidance_scale=float("nan")))
    with pytest.raises(RayboothError, match="--resolution must be at least 1"):
        generate(settings(tiny_model_dir, tmp_path / "out", resolution=0))
    assert not (tmp_path / "out").exists()


def test_generate_attaches_to_a_running_cluster_through_ray_address(ray_cluster, tiny_model_dir, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "raybooth", "generate", "--model_dir", str(tiny_model_dir), "--output_dir",
         str(tmp_path), "--prompts", "a toy car", "--num_samples_per_prompt", "2", "--num_inference_steps", "2"],
        env=os.environ | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"attached to the Ray cluster at {address}" in done.stderr
    assert done.stdout.strip() == str(tmp_path)
    assert len(image_files(tmp_path)) == 2


def test_the_generator_actor_uses_the_device_it_was_given(tiny_model_dir):
    generator = ImageGenerator(str(tiny_model_dir), use_gpu=False, dtype="auto", sampler="dpm++",
                               num_inference_steps=2, guidance_scale=7.5, resolution=64, safety_checker=False)
    assert generator.device == "cpu" and generator.pipeline.unet.dtype == torch.float32
    assert generator.pipeline.safety_checker is None
    out = generator({"prompt": np.array(PROMPTS), "seed": np.array([1, 2]), "file": np.array(["a.png", "b.png"])})
    assert out["file"] == ["a.png", "b.png"]
    assert [image.shape for image in out["image"]] == [(64, 64, 3)] * 2 and out["image"][0].dtype == np.uint8
    pngs = encode_pngs({"file": np.array(out["file"]), "image": out["image"]})["png"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pngs[1]))), out["image"][1])


def test_dpm_solver_is_the_default_sampler_and_model_keeps_the_folders_own(tiny_model_dir):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    from raybooth.config.fields import inference_steps

    assert GenerateConfig(model_dir=tiny_model_dir, output_dir=tiny_model_dir, prompts=PROMPTS).sampler == "dpm++"
    assert inference_steps("dpm++", None) == 20 and inference_steps("model", None) == 50
    assert inference_steps("model", 7) == 7
    row = {"prompt": np.array(PROMPTS[:1]), "seed": np.array([3]), "file": np.array(["a.png"])}
    made = {}
    for sampler in ("dpm++", "model"):
        actor = ImageGenerator(str(tiny_model_dir), use_gpu=False, dtype="auto", sampler=sampler,
                               num_inference_steps=3, guidance_scale=7.5, resolution=64, safety_checker=False)
        made[sampler] = actor(row)["image"][0].astype(np.int16)
        expected = DPMSolverMultistepScheduler if sampler == "dpm++" else PNDMScheduler
        assert type(actor.pipeline.scheduler) is expected
    # DPM-Solver++ runs on the model's own noise schedule (the tiny model's PNDM config).
    assert actor.pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert np.abs(made["dpm++"] - made["model"]).max() > 0  # the sampler does change the image


def test_steps_must_be_positive_when_given(tmp_path, tiny_model_dir):
    with pytest.raises(RayboothError, match="--num_inference_steps must be at least 1"):
        settings(tiny_model_dir, tmp_path, num_inference_steps=0).validate()
