"""The step as the loop calls it: with --compile, Inductor's step does the eager step's arithmetic
and leaves eager the modules that samples, validation and saving use. (A compiled step captured
as a CUDA graph ran on an H100 only: bench/RESULTS.md.)"""

import pytest
import torch
from helpers import config, fixed_batch

from raybooth.models.loading import load_for_training
from raybooth.models.lora import add_to_models
from raybooth.train.optim import build_optimization
from raybooth.train.policy import uses_channels_last, uses_cudnn_attention
from raybooth.train.precision import Precision
from raybooth.train.step import compiled_for_training, make_step

CPU = torch.device("cpu")


def trained(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_compiled_step_trains_as_the_eager_step_does_and_leaves_the_modules_eager(tiny_model_dir, lora):
    batch, runs = fixed_batch(tiny_model_dir), []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = config(compile=compiled, lr=1e-3, use_lora=lora)
        models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True, lora=lora)
        if lora:
            add_to_models(models, cfg)
        modules = (models.unet, models.text_encoder)
        before = [[parameter.detach().clone() for parameter in trained(module)] for module in modules]
        optimization = build_optimization(models, cfg, 3)
        step = make_step(models, optimization.optimizer, Precision("no", CPU), cfg, None, world_size=1)
        torch.manual_seed(1)  # the same latents, noise and timesteps for both
        losses = [step(batch).total.item() for _ in range(3)]
        assert models.unet is modules[0]  # not Dynamo's wrapper: samples and saving stay eager
        updates = [torch.cat([(parameter.detach() - old).flatten() for parameter, old in zip(trained(module), olds)])
                   for module, olds in zip(modules, before)]
        assert all(not torch.equal(parameter, old) for module, olds in zip(modules, before)
                   for parameter, old in zip(trained(module), olds))  # every trained tensor moved
        runs.append((losses, *updates))
    (eager_losses, *eager_updates), (compiled_losses, *compiled_updates) = runs
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for eager, compiled in zip(eager_updates, compiled_updates):  # fused kernels round differently, by little
        assert (compiled - eager).norm() < 1e-3 * eager.norm()


def test_compile_keeps_the_unet_contiguous_where_channels_last_would_be_the_default():
    assert uses_channels_last(config(), "cuda", world_size=1)
    assert not uses_channels_last(config(compile=True), "cuda", world_size=1)  # measured contiguous
    assert uses_channels_last(config(compile=True, channels_last=True), "cuda", world_size=1)


def test_the_vae_encoder_is_compiled_only_for_a_step_that_encodes_images(tiny_model_dir):
    # Crops encoded ahead of the step (batches.py) come in varying numbers: each would cost a compile.
    for encodes_images in (False, True):
        models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True)
        compiled = compiled_for_training(models, encodes_images)
        assert (models.vae.encoder._compiled_call_impl is not None) == encodes_images
        assert compiled.unet is not models.unet and compiled.vae is models.vae


def test_cudnn_attention_is_the_default_from_batch_4_or_with_compile_on_gpus():
    assert not uses_cudnn_attention(config(), "cuda")  # batch 1: its plans would cost the first step more than it saves
    assert uses_cudnn_attention(config(train_batch_size=4), "cuda")
    assert uses_cudnn_attention(config(compile=True), "cuda")
    assert not uses_cudnn_attention(config(train_batch_size=4), "cpu")
    assert uses_cudnn_attention(config(cudnn_attention=True), "cuda")
    assert not uses_cudnn_attention(config(train_batch_size=32, cudnn_attention=False), "cuda")


@pytest.mark.parametrize("cudnn", [False, True], ids=["process-wide", "cudnn-first"])
def test_a_step_asks_for_cudnn_attention_only_while_it_runs(tiny_model_dir, monkeypatch, cudnn):
    # The worker turns cuDNN's attention off for the images it makes (models.use_flash_attention);
    # the step turns it on for its own attention calls and leaves the setting as it found it.
    enabled_during_calls = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        enabled_during_calls.append(torch.backends.cuda.cudnn_sdp_enabled())
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        cfg = config(cudnn_attention=cudnn)
        models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True)
        optimization = build_optimization(models, cfg, 1)
        step = make_step(models, optimization.optimizer, Precision("no", CPU), cfg, None, world_size=1)
        assert torch.isfinite(step(fixed_batch(tiny_model_dir)).total)
        assert enabled_during_calls and set(enabled_during_calls) == {cudnn}  # the UNet's and the text encoder's
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
