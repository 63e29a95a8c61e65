"""The loss and step options of training.py and optim.py: offset noise, Min-SNR weighting,
gradient accumulation, gradient checkpointing, prompts encoded once, the tokenizer's length."""

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import fixed_batch

from raybooth.models.loading import load_for_training, load_tokenizer, tokenize
from raybooth.train.loss import Batch, dreambooth_loss, min_snr_weights, prior_preservation_loss
from raybooth.train.optim import enable_gradient_checkpointing, precompute_prompt_embeddings
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

CPU = torch.device("cpu")


def models_for(tiny_model_dir, train_text_encoder=True):
    return load_for_training(tiny_model_dir, CPU, CPU, torch.float32, train_text_encoder)


def noise_seen(models, batch, **options) -> torch.Tensor:
    """The noise dreambooth_loss adds, from seed 0."""
    seen = []
    add_noise = models.noise_scheduler.add_noise
    models.noise_scheduler.add_noise = lambda latents, noise, t: seen.append(noise) or add_noise(latents, noise, t)
    torch.manual_seed(0)
    with torch.no_grad():
        dreambooth_loss(models, batch, 1.0, **options)
    models.noise_scheduler.add_noise = add_noise
    return seen[0]


def test_offset_noise_adds_a_per_image_per_channel_constant_of_scale_0_1(tiny_model_dir):
    models, batch = models_for(tiny_model_dir), fixed_batch(tiny_model_dir)
    offset = noise_seen(models, batch, offset_noise=True) - noise_seen(models, batch)
    per_channel = offset[:, :, :1, :1]
    assert torch.allclose(offset, per_channel.expand_as(offset), atol=1e-6)  # constant over each image's channel
    assert per_channel.abs().min() > 0
    assert 0.02 < per_channel.std() < 0.3  # 0.1 x a standard normal


def test_min_snr_weights_follow_compute_snr_for_epsilon_and_velocity():
    timesteps = torch.tensor([0, 10, 200, 999])
    for prediction_type, denominator in (("epsilon", 0), ("v_prediction", 1)):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
        alpha_bar = scheduler.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar)  # the signal-to-noise ratio, written out
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + denominator)
        torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0), expected)
    weighted = prior_preservation_loss(torch.ones(4, 1, 1, 2), torch.zeros(4, 1, 1, 2), 0.5,
                                       torch.tensor([1.0, 3.0, 2.0, 0.0]))
    assert (weighted.instance.item(), weighted.prior.item(), weighted.total.item()) == (2.0, 1.0, 2.5)


def test_snr_gamma_weights_the_loss_and_a_gamma_beyond_every_snr_leaves_it_as_it_was(tiny_model_dir):
    models, batch = models_for(tiny_model_dir), fixed_batch(tiny_model_dir)

    def loss(**options) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return dreambooth_loss(models, batch, 1.0, **options).total.item()

    assert loss(snr_gamma=0.05) < 0.9 * loss()  # SNR is below 5 past t ~ 100; below 0.05 only past ~ 750
    assert loss(snr_gamma=1e9) == pytest.approx(loss(), rel=1e-5)  # every weight min(snr, gamma) / snr = 1


@pytest.fixture
def deterministic_draws(monkeypatch):
    """Latent samples and noise as fixed functions of each row, one timestep for all: a batch of 2
    and two micro-batches of 1 then see the very same examples."""
    monkeypatch.setattr(torch, "randn_like", lambda tensor, **kwargs: torch.sin(3.0 * tensor + 1.0))
    monkeypatch.setattr(torch, "randint", lambda low, high, size, device=None, **kwargs:
                        torch.full(size, 500, dtype=torch.long, device=device))


def test_two_accumulated_micro_batches_of_1_give_the_update_of_one_batch_of_2(tiny_model_dir, deterministic_draws):
    batch = fixed_batch(tiny_model_dir)  # rows: instance 0, instance 1, class 0, class 1
    micro_batches = [Batch(batch.pixels[[i, i + 2]], batch.prompt_ids[[i, i + 2]]) for i in range(2)]

    def update(step_input) -> tuple[list[torch.Tensor], float]:
        models = models_for(tiny_model_dir)
        parameters = models.trainable_parameters()
        before = [p.detach().clone() for p in parameters]
        optimizer = torch.optim.SGD(parameters, lr=0.1)  # the update is the gradient itself
        loss = train_step(models, optimizer, Precision("no", CPU), step_input, 1.0, max_grad_norm=0.5)
        return [p.detach() - b for p, b in zip(parameters, before)], loss.total.item()

    whole, whole_loss = update(batch)
    accumulated, accumulated_loss = update(micro_batches)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sum(delta.abs().sum() for delta in whole) > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_keeps_fewer_activations(tiny_model_dir):
    batch = fixed_batch(tiny_model_dir)

    def run(checkpointing: bool):
        models = models_for(tiny_model_dir)
        if checkpointing:
            enable_gradient_checkpointing(models)
        kept = []

        def pack(tensor):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = dreambooth_loss(models, batch, 1.0).total
        loss.backward()
        return loss.item(), [p.grad for p in models.trainable_parameters()], sum(kept)

    loss, gradients, kept = run(False)
    checkpointed_loss, checkpointed_gradients, checkpointed_kept = run(True)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(checkpointed_gradients, gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert checkpointed_kept < 0.6 * kept  # the activations kept for the backward pass


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_prompts_encoded_once_give_the_loss_of_encoding_each_step_and_the_encoder_is_freed(family, request):
    model_dir = request.getfixturevalue("tiny_xl_dir" if family == "sdxl" else "tiny_model_dir")
    models, batch = models_for(model_dir, train_text_encoder=False), fixed_batch(model_dir)
    precision = Precision("no", CPU)
    torch.manual_seed(0)
    each_step = dreambooth_loss(models, batch, 1.0).total.item()
    embeddings, pooled = precompute_prompt_embeddings(models, batch.prompt_ids, precision)
    assert models.text_encoder is None and models.text_encoder_2 is None
    assert (pooled is not None) == (family == "sdxl")  # SDXL's pooled embedding is kept too
    torch.manual_seed(0)
    once = dreambooth_loss(models, Batch(batch.pixels, batch.prompt_ids, prompt_embeds=embeddings,
                                         pooled_embeds=pooled, time_ids=batch.time_ids), 1.0)
    assert once.total.item() == pytest.approx(each_step, rel=1e-6)


def test_tokenizer_max_length_sets_the_length_of_the_prompt_ids(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenize(tokenizer, "a photo of unqtkn toy car").shape == (77,)
    short = tokenize(tokenizer, "a photo of unqtkn toy car", max_length=32)
    assert short.shape == (32,) and short[-1] == tokenizer.pad_token_id
