import pytest
import torch
from diffusers import DDPMScheduler
from helpers import fixed_batch, fp32_models, snapshot

from raybooth.models.loading import load_for_training, load_tokenizer
from raybooth.train.loss import (
    Batch,
    diffusion_target,
    dreambooth_loss,
    latent_distribution,
    prior_preservation_loss,
    sample_latents,
)
from raybooth.train.optim import make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

CPU = torch.device("cpu")


def test_prior_preservation_loss_matches_hand_computed_value():
    # Rows 0 is the instance half, row 1 the class half; the target is zero.
    prediction = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).reshape(2, 1, 1, 2)
    loss = prior_preservation_loss(prediction, torch.zeros_like(prediction), prior_loss_weight=0.5)
    assert loss.instance.item() == pytest.approx((1 + 4) / 2)
    assert loss.prior.item() == pytest.approx((9 + 25) / 2)
    assert loss.total.item() == pytest.approx(2.5 + 0.5 * 17)


def test_target_follows_prediction_type():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    epsilon = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(epsilon, latents, noise, timesteps), noise)

    velocity = DDPMScheduler(prediction_type="v_prediction")
    alpha_bar = velocity.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = sqrt(a) eps - sqrt(1-a) x0
    torch.testing.assert_close(diffusion_target(velocity, latents, noise, timesteps), expected)

    with pytest.raises(ValueError, match="sample"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def evaluation_loss(models, batch: Batch) -> float:
    torch.manual_seed(1234)  # the same latents, noise and timesteps every time it is called
    with torch.no_grad():
        return dreambooth_loss(models, batch, prior_loss_weight=1.0).total.item()


def changed(before, module) -> float:
    """Fraction of parameter tensors of `module` that differ from `before`."""
    after = dict(module.named_parameters())
    return sum(not torch.equal(before[n], after[n]) for n in before) / len(before)


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_steps_on_a_fixed_batch_lower_the_loss_and_train_the_chosen_modules(tiny_model_dir, train_text_encoder):
    torch.manual_seed(0)
    precision = Precision("no", CPU)
    models = load_for_training(tiny_model_dir, CPU, CPU, precision.frozen_dtype, train_text_encoder)
    optimizer = make_optimizer(models.trainable_parameters(), lr=1e-3)
    batch = fixed_batch(tiny_model_dir)
    unet_before, text_before, vae_before = snapshot(models.unet), snapshot(models.text_encoder), snapshot(models.vae)
    embedding_before = models.text_encoder.get_input_embeddings().weight.detach().clone()

    loss_before = evaluation_loss(models, batch)
    for _ in range(12):
        train_step(models, optimizer, precision, batch, prior_loss_weight=1.0, max_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)
    loss_after = evaluation_loss(models, batch)

    assert loss_after < 0.8 * loss_before
    assert changed(unet_before, models.unet) > 0.95
    assert changed(vae_before, models.vae) == 0
    if train_text_encoder:
        assert changed(text_before, models.text_encoder) > 0.95
        # The identifier's embedding is what DreamBooth teaches the text encoder.
        u = load_tokenizer(tiny_model_dir).convert_tokens_to_ids("u")
        assert not torch.equal(embedding_before[u], models.text_encoder.get_input_embeddings().weight[u])
    else:
        assert changed(text_before, models.text_encoder) == 0


def test_bf16_mixed_precision_keeps_small_updates_that_bf16_weights_lose(tiny_model_dir):
    """At lr 5e-6 an AdamW update is far below a bf16 weight's rounding step. Our fp32 master
    weights apply it; the same update added to bf16 weights (Ray's example) mostly vanishes."""
    torch.manual_seed(0)
    precision = Precision("bf16", CPU)
    models = load_for_training(tiny_model_dir, CPU, CPU, precision.frozen_dtype, train_text_encoder=True)
    assert models.vae.dtype == torch.bfloat16
    parameters = models.trainable_parameters()
    assert all(p.dtype == torch.float32 for p in parameters)
    optimizer = make_optimizer(parameters, lr=5e-6)
    before = [p.detach().clone() for p in parameters]
    batch = fixed_batch(tiny_model_dir)

    train_step(models, optimizer, precision, batch, prior_loss_weight=1.0, max_grad_norm=1.0)

    kept = lost = total = 0
    for old, new in zip(before, parameters):
        moved = new.detach() != old
        total += moved.numel()
        kept += moved.sum().item()
        in_bf16 = (old.bfloat16() + (new.detach() - old).bfloat16()) != old.bfloat16()
        lost += (~in_bf16).sum().item()
    assert kept / total > 0.95  # fp32 masters: nearly every weight moved
    assert lost / total > 0.5  # bf16 weights: most of the same updates round away


def test_fp16_mixed_precision_scales_the_loss_and_steps(tiny_model_dir):
    torch.manual_seed(0)
    precision = Precision("fp16", CPU)
    assert precision.scaler is not None
    models = load_for_training(tiny_model_dir, CPU, CPU, precision.frozen_dtype, train_text_encoder=True)
    optimizer = make_optimizer(models.trainable_parameters(), lr=1e-4)
    before = snapshot(models.unet)
    batch = fixed_batch(tiny_model_dir)
    for _ in range(3):  # the scaler may skip a first step whose scaled gradients overflow
        loss = train_step(models, optimizer, precision, batch, prior_loss_weight=1.0, max_grad_norm=1.0)
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss.total)
    assert changed(before, models.unet) > 0.5


def test_auto_precision_is_full_precision_on_cpu():
    assert Precision("auto", CPU).mode == "no"
    assert Precision("no", CPU).autocast().__class__.__name__ == "nullcontext"


def test_cached_latents_give_the_loss_that_encoding_the_images_gives(tiny_model_dir):
    """Class images at the training resolution are encoded once, instance crops when first drawn
    (batches.py): a step then draws from the cached latent distribution instead of running the
    VAE on the same image again. With the VAE's latent noise switched off, both ways must give
    the very same loss."""
    models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, train_text_encoder=True)
    quant = models.vae.quant_conv  # outputs (mean, logvar): logvar -30 makes each latent its mean
    with torch.no_grad():
        quant.weight[4:] = 0
        quant.bias[4:] = -30.0
    batch = fixed_batch(tiny_model_dir)
    with torch.no_grad():
        mean, std = latent_distribution(models.vae, batch.pixels[2:])
    cached = Batch(batch.pixels[:2], batch.prompt_ids, mean, std)
    assert evaluation_loss(models, cached) == pytest.approx(evaluation_loss(models, batch), rel=1e-5)
    torch.manual_seed(0)
    encoded = sample_latents(models, batch)
    torch.manual_seed(0)
    torch.testing.assert_close(sample_latents(models, cached), encoded)
    with torch.no_grad():
        instance_mean, instance_std = latent_distribution(models.vae, batch.pixels[:2])
    every_row = Batch(None, batch.prompt_ids, torch.cat([instance_mean, mean]), torch.cat([instance_std, std]))
    assert evaluation_loss(models, every_row) == pytest.approx(evaluation_loss(models, batch), rel=1e-5)
    torch.manual_seed(0)
    torch.testing.assert_close(sample_latents(models, every_row), encoded)
    swapped = Batch(batch.pixels[:2], batch.prompt_ids, mean.flip(0), std)  # class rows in the wrong order
    assert not torch.allclose(sample_latents(models, swapped), encoded, atol=1e-3)


def test_a_channels_last_unet_trains_as_the_contiguous_one(tiny_model_dir):
    # --channels_last changes where the UNet's numbers lie in memory, not the arithmetic.
    batch = fixed_batch(tiny_model_dir)
    runs = []
    for channels_last in (False, True):
        models = fp32_models(tiny_model_dir, channels_last)
        optimizer = make_optimizer(models.trainable_parameters(), 1e-3)
        torch.manual_seed(0)
        losses = []
        for _ in range(3):
            losses.append(train_step(models, optimizer, Precision("no", CPU), batch, 1.0, 1.0).total.item())
            optimizer.zero_grad()
        runs.append((losses, snapshot(models.unet)))
    (losses, weights), (cl_losses, cl_weights) = runs
    assert losses == pytest.approx(cl_losses, rel=1e-5)
    # The convolutions sum in another order; AdamW divides each gradient by its own size, so
    # where a gradient is nearly zero that rounding shows. Elsewhere the weights agree.
    gaps = torch.cat([(weights[name] - cl_weights[name]).abs().flatten() for name in weights])
    assert (gaps > 1e-5).float().mean() < 1e-4 and gaps.max() < 1e-3  # 1e-3: one step's size at this lr
    assert cl_weights["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)
