"""The SDXL script's LoRA and optimizer options, on both families: --use_dora (magnitude vectors
that train, survive diffusers' loader and raybooth's, and give one image), --lora_dropout (in
training only), --optimizer prodigy (steps, adapts its step size, resumes from a checkpoint),
--adam_weight_decay_text_encoder (the text encoders' group alone), and the combinations refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import INSTANCE_PROMPT, config, fixed_batch, snapshot, train_config
from PIL import Image

from raybooth.commands.cli import main
from raybooth.errors import RayboothError
from raybooth.generate.on_worker import pipeline_from_models
from raybooth.models import lora
from raybooth.models.loading import load_for_training
from raybooth.train.checkpoints import restore, write_checkpoint
from raybooth.train.optim import build_optimization
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

CPU = torch.device("cpu")
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(params=["sd", "sdxl"])
def family_dir(request, tiny_model_dir, tiny_xl_dir):
    return request.param, tiny_model_dir if request.param == "sd" else tiny_xl_dir


def lora_models(model_dir, **settings):
    """The frozen tiny model with adapters on the UNet and every text encoder, as `train --use_lora` adds them."""
    models = load_for_training(model_dir, CPU, CPU, torch.float32, True, lora=True)
    lora.add_to_models(models, config(use_lora=True, **settings))
    return models


def magnitudes(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if "lora_magnitude_vector" in name}


def unet_output(models, batch):
    """The UNet's prediction for the batch's first row, from fixed noise and conditioning (dropout
    masks come from the global generator: each call draws new ones)."""
    latents = torch.randn(1, models.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden, pooled = models.encode_prompts(batch.prompt_ids[:1])
    extra = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": batch.time_ids[:1]}}
    return models.unet(latents, torch.tensor([500]), hidden, **extra).sample


def steps(models, cfg, count, batch, on_step=lambda optimization: None):
    optimization = build_optimization(models, cfg, count)
    losses = []
    for _ in range(count):
        losses.append(train_step(models, optimization.optimizer, Precision("no", CPU), batch, 1.0, 1.0).total.item())
        optimization.optimizer.zero_grad(set_to_none=True)
        optimization.after_step()
        on_step(optimization)
    return optimization, losses


def test_dora_starts_at_the_base_model_and_its_magnitudes_train_on_every_adapted_module(family_dir):
    _, model_dir = family_dir
    batch = fixed_batch(model_dir)
    base = load_for_training(model_dir, CPU, CPU, torch.float32, True, lora=True)
    models = lora_models(model_dir, use_dora=True)
    with torch.no_grad():
        torch.testing.assert_close(unet_output(models, batch), unet_output(base, batch), rtol=0, atol=1e-6)
    modules = {"unet": models.unet, **models.text_encoders()}
    before = {name: magnitudes(module) for name, module in modules.items()}
    assert all(before.values()), {name: len(m) for name, m in before.items()}  # on the UNet and each encoder
    frozen = {name: {k: v for k, v in snapshot(module).items() if ".lora_" not in k}
              for name, module in modules.items()}
    _, losses = steps(models, config(use_lora=True, use_dora=True, lr=1e-2), 1, batch)
    assert all(np.isfinite(losses))
    for name, module in modules.items():
        after = magnitudes(module)
        assert any(not torch.equal(after[k], before[name][k]) for k in after), f"{name}'s magnitudes did not move"
        now = snapshot(module)
        assert all(torch.equal(now[k], v) for k, v in frozen[name].items()), f"{name}'s base weights moved"


def trained_dora_folder(model_dir, folder):
    """A DoRA adapter as after training (B and the magnitudes moved off their start), saved as
    `train --use_lora` leaves it."""
    cfg = config(use_lora=True, use_dora=True, lora_dropout=0.1, optimizer="prodigy")
    models = lora_models(model_dir, use_dora=True, lora_dropout=0.1)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in (models.unet, *models.text_encoders().values()):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
                elif "lora_magnitude_vector" in name:
                    parameter.mul_(1 + 0.2 * torch.rand_like(parameter))
    lora.save_output(models, folder, cfg, model_dir, 64)
    for module in (models.unet, *models.text_encoders().values()):
        module.eval()  # no dropout: its outputs are compared
    settings = json.loads((folder / lora.LORA_SETTINGS).read_text())
    assert (settings["use_dora"], settings["lora_dropout"], settings["optimizer"], settings["learning_rate"]) == (
        True, 0.1, "prodigy", 1.0)
    return models


def generate(model_dir, folder, *extra) -> np.ndarray:
    assert main(["generate", "--model_dir", str(model_dir), "--output_dir", str(folder), "--prompts",
                 INSTANCE_PROMPT, "--num_inference_steps", "2", "--no_use_gpu", "--local_mode", *extra]) == 0
    return np.asarray(Image.open(next(folder.glob("*.png"))), dtype=np.int16)


def test_a_dora_adapter_loads_in_diffusers_and_raybooth_generate_draws_what_diffusers_does(family_dir, tmp_path):
    family, model_dir = family_dir
    trained = trained_dora_folder(model_dir, tmp_path / "dora")
    batch = fixed_batch(model_dir)
    pipeline = PIPELINES[family].from_pretrained(model_dir, **({"add_watermarker": False} if family == "sdxl" else {}))
    pipeline.load_lora_weights(tmp_path / "dora")  # diffusers' own loader, unchanged
    parts = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    if family == "sdxl":
        parts["text_encoder_2"] = pipeline.text_encoder_2
    for name, module in parts.items():  # every magnitude vector came through, value for value
        config_ = next(iter(module.peft_config.values()))
        assert config_.use_dora, name
        ours, theirs = magnitudes(getattr(trained, name)), magnitudes(module)
        assert len(ours) == len(theirs) > 0, name
        for (_, a), (_, b) in zip(sorted(ours.items()), sorted(theirs.items())):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = load_for_training(model_dir, CPU, CPU, torch.float32, True, lora=True)
    loaded.unet, loaded.text_encoder, loaded.text_encoder_2 = pipeline.unet, pipeline.text_encoder, getattr(
        pipeline, "text_encoder_2", None)
    with torch.no_grad():  # diffusers' adapter layers drop nothing, though trained with dropout 0.1
        torch.testing.assert_close(unet_output(loaded, batch), unet_output(trained, batch))
    # The base as diffusers fuses the adapter into it, and raybooth generate applying the file: one image.
    pipeline.fuse_lora(components=list(parts))
    pipeline.unload_lora_weights()
    pipeline.save_pretrained(tmp_path / "fused-by-diffusers")
    ours = generate(model_dir, tmp_path / "applied", "--lora_weights_dir", str(tmp_path / "dora"))
    theirs = generate(tmp_path / "fused-by-diffusers", tmp_path / "from-fused")
    base = generate(model_dir, tmp_path / "base")
    assert np.abs(ours - theirs).max() <= 1 and np.abs(ours - base).max() > 2


def test_lora_dropout_drops_in_training_only_and_samples_never(tiny_model_dir):
    models = lora_models(tiny_model_dir, lora_dropout=0.5)
    with torch.no_grad():
        for module in (models.unet, models.text_encoder):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
    batch = fixed_batch(tiny_model_dir)
    with torch.no_grad():
        assert models.unet.training
        trained = [unet_output(models, batch) for _ in range(2)]
        assert not torch.allclose(trained[0], trained[1])  # each pass drops other inputs
        pipeline = pipeline_from_models(models, tiny_model_dir, "dpm++")  # what samples and validation use
        models.unet.eval(), models.text_encoder.eval()
        evaluated = [unet_output(models, batch) for _ in range(2)]
        torch.testing.assert_close(evaluated[0], evaluated[1], rtol=0, atol=0)
        sampled = unet_output(dataclasses.replace(models, unet=pipeline.unet, text_encoder=pipeline.text_encoder),
                              batch)
        torch.testing.assert_close(sampled, evaluated[0], rtol=1e-5, atol=1e-5)


def prodigy_config(**overrides):
    """Prodigy without its warm-up safeguard and bias correction, whose estimate of the step size
    then grows within a few steps (with them, over tens to hundreds)."""
    return config(use_lora=True, optimizer="prodigy", adam_weight_decay=0.0, prodigy_safeguard_warmup=False,
                  prodigy_use_bias_correction=False, **overrides)


def test_prodigy_steps_grows_its_step_size_and_trains(tiny_model_dir):
    models = lora_models(tiny_model_dir)
    before = {k: v for k, v in snapshot(models.unet).items() if "lora_B" in k}
    sizes = []
    optimization, losses = steps(models, prodigy_config(), 4, fixed_batch(tiny_model_dir),
                                 lambda optimization: sizes.append(optimization.optimizer.param_groups[0]["d"]))
    groups = optimization.optimizer.param_groups
    assert type(optimization.optimizer).__name__ == "Prodigy" and [g["lr"] for g in groups] == [1.0, 1.0]
    assert all(np.isfinite(losses))
    assert sizes == sorted(sizes) and sizes[-1] > 3 * groups[0]["d0"]  # the step size it finds, from 1e-6 up
    after = snapshot(models.unet)
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_prodigy_resumes_from_a_checkpoint_as_if_never_stopped(tiny_model_dir, tmp_path):
    cfg, batch = prodigy_config(), fixed_batch(tiny_model_dir)
    models = lora_models(tiny_model_dir)
    optimization, _ = steps(models, cfg, 2, batch)
    write_checkpoint(tmp_path, 0, models, optimization, 2, [], {}, {})
    resumed_models = lora_models(tiny_model_dir)
    resumed = build_optimization(resumed_models, cfg, 2)
    restore(tmp_path, 0, resumed_models, resumed)
    assert resumed.optimizer.param_groups[0]["d"] == optimization.optimizer.param_groups[0]["d"] > 1e-6
    for run_models, run in ((models, optimization), (resumed_models, resumed)):
        torch.manual_seed(7)  # the step's noise and timesteps
        train_step(run_models, run.optimizer, Precision("no", CPU), batch, 1.0, 1.0)
    ours, theirs = snapshot(models.unet), snapshot(resumed_models.unet)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the same next step: the same d and moments


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_the_text_encoders_weight_decay_reaches_both_sdxl_encoders_and_nothing_else(tiny_xl_dir, optimizer):
    """With zero gradients a step is the decoupled decay alone: each weight shrinks by its group's
    rate times its decay (Prodigy's rate is d x lr)."""
    models = load_for_training(tiny_xl_dir, CPU, CPU, torch.float32, True)
    prodigy = dict(lr=0.5 / 1e-6, prodigy_use_bias_correction=False)  # d starts at 1e-6: a rate of 0.5
    cfg = config(optimizer=optimizer, adam_weight_decay=0.01, adam_weight_decay_text_encoder=0.2,
                 **(prodigy if optimizer == "prodigy" else dict(lr=0.5)))
    optimization = build_optimization(models, cfg, 1)
    parts = {"unet": models.unet, "text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2}
    before = {name: snapshot(module) for name, module in parts.items()}
    for parameter in models.trainable_parameters():
        parameter.grad = torch.zeros_like(parameter)
    if optimizer == "prodigy":  # Prodigy skips a step whose gradients are all zero: one tiny one gets it going
        next(models.unet.parameters()).grad.fill_(1e-12)
    optimization.optimizer.step()
    rate = cfg.lr * (optimization.optimizer.param_groups[0]["d"] if optimizer == "prodigy" else 1.0)
    for name, module in parts.items():
        decay = 0.01 if name == "unet" else 0.2
        weight = next(n for n, p in module.named_parameters() if p.requires_grad and p.ndim == 2)
        shrunk = dict(module.named_parameters())[weight].detach() / before[name][weight]
        torch.testing.assert_close(shrunk, torch.full_like(shrunk, 1 - rate * decay), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--use_dora"], "--use_dora and --lora_dropout need --use_lora"),
    (["--lora_dropout", "0.1"], "--use_dora and --lora_dropout need --use_lora"),
    (["--use_lora", "--lora_dropout", "1"], r"--lora_dropout must be in \[0, 1\), got 1.0"),
    (["--use_lora", "--lora_dropout", "-0.1"], r"--lora_dropout must be in \[0, 1\)"),
    (["--use_lora", "--lora_dropout", "nan"], r"--lora_dropout must be in \[0, 1\)"),
    (["--optimizer", "prodigy", "--use_8bit_adam"], "--use_8bit_adam is 8-bit AdamW; it does not go with"),
    (["--prodigy_beta3", "0.9"], "--prodigy_beta3 needs --optimizer prodigy"),
    (["--no_prodigy_decouple", "--no_prodigy_safeguard_warmup"],
     "--prodigy_decouple, --prodigy_safeguard_warmup need --optimizer prodigy"),
    (["--optimizer", "prodigy", "--prodigy_beta3", "1.5"], r"--prodigy_beta3 must be in \[0, 1\)"),
    (["--optimizer", "prodigy", "--text_encoder_lr", "0.5"], "drop --text_encoder_lr 0.5"),
    (["--adam_weight_decay_text_encoder", "0.1", "--no_train_text_encoder"], "need a trained text encoder"),
    (["--adam_weight_decay_text_encoder", "-1"], "--adam_weight_decay_text_encoder must be >= 0"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(flags, message):
    with pytest.raises(RayboothError, match=message) as error:
        train_config(*flags).validate()
    assert "\n" not in str(error.value)


def test_prodigy_defaults_its_rate_to_1_and_says_when_one_is_low_or_its_package_is_missing(monkeypatch, capsys):
    assert train_config("--optimizer", "prodigy").learning_rate() == 1.0
    train_config("--optimizer", "prodigy", "--text_encoder_lr", "1.0").validate()  # the blog's command: one rate
    assert capsys.readouterr().err == ""
    train_config("--optimizer", "prodigy", "--lr", "1e-4").validate()
    assert "--lr 0.0001 is low for --optimizer prodigy" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    missing = r"needs prodigyopt, which is not installed: pip install 'raybooth\[prodigy\]'"
    with pytest.raises(RayboothError, match=missing):
        train_config("--optimizer", "prodigy").validate()
