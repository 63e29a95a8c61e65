"""The optimizer side of the training options: schedules, scaled and per-group learning rates,
stopping the text encoder, the EMA, 8-bit Adam, and their state across a checkpoint."""

import importlib.util
import math

import pytest
import torch
from helpers import config, fixed_batch, snapshot
from safetensors.torch import load_file

from raybooth.errors import RayboothError
from raybooth.models.loading import load_for_training, save_trained_modules
from raybooth.models.modules import DreamBoothModels
from raybooth.train.checkpoints import restore, write_checkpoint
from raybooth.train.optim import build_optimization, check_8bit_adam, learning_rates
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

CPU = torch.device("cpu")


def linear_models(train_text_encoder=True) -> DreamBoothModels:
    return DreamBoothModels(unet=torch.nn.Linear(4, 4), text_encoder=torch.nn.Linear(4, 4), vae=None,
                            noise_scheduler=None, train_text_encoder=train_text_encoder)


def rates_over(optimization, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(float(optimization.optimizer.param_groups[0]["lr"]))
        optimization.optimizer.step()
        optimization.after_step()
    return rates


# diffusers' schedules, written out: 10 steps, 2 of them warm-up, peak 1.0.
WARMUP, TOTAL = 2, 10


def progress(step: int) -> float:
    return (step - WARMUP) / (TOTAL - WARMUP)


EXPECTED = {
    "constant": lambda step: 1.0,  # no warm-up at all
    "constant_with_warmup": lambda step: 1.0,
    "linear": lambda step: 1 - progress(step),
    "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * progress(step))),
    "cosine_with_restarts": lambda step: 0.5 * (1 + math.cos(math.pi * ((2 * progress(step)) % 1.0))),
    "polynomial": lambda step: (1 - 1e-7) * (1 - progress(step)) ** 2 + 1e-7,  # lr_end 1e-7, power 2
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_schedule_gives_its_learning_rate_curve_after_a_linear_warmup(name):
    cfg = config(lr=1.0, lr_scheduler=name, lr_warmup_steps=WARMUP, lr_num_cycles=2, lr_power=2.0)
    rates = rates_over(build_optimization(linear_models(), cfg, TOTAL), TOTAL)
    expected = [EXPECTED[name](step) if step >= WARMUP or name == "constant" else step / WARMUP
                for step in range(TOTAL)]
    assert rates == pytest.approx(expected, abs=1e-9)
    assert len(set(rates)) == 1 if name == "constant" else len(set(rates)) > 2


def test_scale_lr_multiplies_by_the_examples_of_one_optimizer_step():
    cfg = config(lr=1e-6, train_batch_size=2, gradient_accumulation_steps=3)
    assert learning_rates(cfg, world_size=4) == (1e-6, 1e-6)
    scaled = config(lr=1e-6, train_batch_size=2, gradient_accumulation_steps=3, scale_lr=True, text_encoder_lr=5e-7)
    assert learning_rates(scaled, world_size=4) == (pytest.approx(24e-6), 5e-7)


def test_the_text_encoder_is_a_parameter_group_of_its_own_with_its_learning_rate():
    models = linear_models()
    optimizer = build_optimization(models, config(lr=1e-4, text_encoder_lr=3e-5), 10).optimizer
    unet, text_encoder = optimizer.param_groups
    assert (unet["lr"], text_encoder["lr"]) == (1e-4, 3e-5)
    assert unet["params"] == list(models.unet.parameters())
    assert text_encoder["params"] == list(models.text_encoder.parameters())
    adam = config(adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.1, adam_epsilon=1e-6)
    group = build_optimization(linear_models(False), adam, 10).optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.95), 0.1, 1e-6)
    assert len(build_optimization(linear_models(False), config(), 10).optimizer.param_groups) == 1


def test_rates_a_cuda_graph_reads_stay_the_same_tensors_through_steps_and_a_restore():
    """A captured step reads the tensors it saw at capture; they must be written in place."""
    cfg = config(lr=1.0, lr_scheduler="linear", train_text_encoder_steps=2)
    models = linear_models()
    optimization = build_optimization(models, cfg, 4, lr_as_tensor=True)
    tensors = list(optimization.lr_tensors)
    assert rates_over(optimization, 3) == [1.0, 0.75, 0.5]
    assert [float(t) for t in tensors] == [0.25, 0.0]  # the text encoder stopped after step 2
    assert float(models.text_encoder_gate) == 0.0
    state = optimization.state_dict()
    again = build_optimization(models, cfg, 4, lr_as_tensor=True)
    again.load_state_dict(state)
    assert [group["lr"] is tensor for group, tensor in zip(again.optimizer.param_groups, again.lr_tensors)] == [True] * 2
    assert [float(t) for t in again.lr_tensors] == [0.25, 0.0] and again.steps_taken == 3


def tiny_training(tiny_model_dir, cfg, steps: int, on_step=lambda step, models: None):
    torch.manual_seed(0)
    models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, cfg.train_text_encoder)
    optimization = build_optimization(models, cfg, steps)
    batch, precision = fixed_batch(tiny_model_dir), Precision("no", CPU)
    for step in range(1, steps + 1):
        train_step(models, optimization.optimizer, precision, batch, 1.0, 1.0)
        optimization.optimizer.zero_grad(set_to_none=True)
        optimization.after_step()
        on_step(step, models)
    return models, optimization


def test_the_text_encoder_stops_changing_after_train_text_encoder_steps(tiny_model_dir):
    seen = {}
    _, optimization = tiny_training(tiny_model_dir, config(lr=1e-3, train_text_encoder_steps=2), 4,
                                    lambda step, models: seen.update({step: (snapshot(models.text_encoder),
                                                                             snapshot(models.unet))}))
    text_encoder, unet = {step: s[0] for step, s in seen.items()}, {step: s[1] for step, s in seen.items()}
    assert any(not torch.equal(text_encoder[1][n], text_encoder[2][n]) for n in text_encoder[1])  # trained up to 2
    assert all(torch.equal(text_encoder[2][n], text_encoder[4][n]) for n in text_encoder[2])  # then frozen
    assert any(not torch.equal(unet[2][n], unet[4][n]) for n in unet[2])  # while the UNet trains on


def test_the_ema_differs_from_and_tracks_the_trained_unet_and_is_what_is_saved(tiny_model_dir, tmp_path):
    initial = snapshot(load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True).unet)
    models, optimization = tiny_training(tiny_model_dir, config(lr=1e-3, use_ema=True), 12)
    names = [name for name, p in models.unet.named_parameters() if p.requires_grad]
    raw = {name: p.detach().clone() for name, p in models.unet.named_parameters()}
    ema = dict(zip(names, optimization.ema.shadow_params))

    def distance(a, b):
        return sum((a[n] - b[n]).norm() ** 2 for n in names) ** 0.5

    assert distance(ema, raw) > 0  # an average lags behind the weights...
    assert distance(ema, raw) < 0.5 * distance(initial, raw)  # ...but follows them from where they started
    optimization.finish()
    save_trained_modules(models, tmp_path)
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[name], ema[name]) for name in names)


def test_scheduler_and_ema_state_come_back_from_a_checkpoint(tiny_model_dir, tmp_path):
    cfg = config(lr=1e-3, use_ema=True, lr_scheduler="cosine", lr_warmup_steps=1)
    models, optimization = tiny_training(tiny_model_dir, cfg, 3)
    write_checkpoint(tmp_path, 0, models, optimization, 3, [], {}, {})
    fresh = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True)
    resumed = build_optimization(fresh, cfg, 3)
    restore(tmp_path, 0, fresh, resumed)
    assert resumed.steps_taken == 3 and resumed.ema.optimization_step == 3
    assert resumed.learning_rates() == optimization.learning_rates()
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow_params, optimization.ema.shadow_params))


def test_8bit_adam_keeps_8bit_moments_and_trains(tiny_model_dir):
    before = snapshot(load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True).unet)
    models, optimization = tiny_training(tiny_model_dir, config(lr=1e-3, use_8bit_adam=True), 2)
    states = list(optimization.optimizer.state.values())
    assert any(state["state1"].dtype == torch.uint8 for state in states)  # large tensors' moments: 8 bits
    assert all(p.dtype == torch.float32 for p in models.trainable_parameters())
    assert any(not torch.equal(before[n], p) for n, p in models.unet.named_parameters())


def test_8bit_adam_where_it_cannot_run_is_one_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(RayboothError, match=r"needs bitsandbytes, which is not installed: pip install 'raybooth\[8bit\]'"):
        check_8bit_adam(on_gpu=False)
    monkeypatch.undo()

    def no_cpu_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for cpu")

    monkeypatch.setattr("raybooth.train.optim.make_optimizer", no_cpu_kernel)
    with pytest.raises(RayboothError, match="cannot run 8-bit AdamW on the CPU"):
        check_8bit_adam(on_gpu=False)
    check_8bit_adam(on_gpu=True)  # on GPUs the CPU kernel does not matter


def test_options_that_rule_out_a_cuda_graph_say_so_in_one_line():
    from raybooth.train.step import use_cuda_graph

    gpu, said = torch.device("cuda"), []  # a device object only: nothing runs on it
    bf16 = Precision("bf16", gpu)
    assert use_cuda_graph(config(use_ema=True, gradient_accumulation_steps=2, lr_scheduler="cosine",
                                 gradient_checkpointing=True), bf16, gpu, gpu, said.append)
    assert not use_cuda_graph(config(use_8bit_adam=True), bf16, gpu, gpu, said.append)
    assert not use_cuda_graph(config(text_encoder_lr=1e-6), bf16, gpu, gpu, said.append)
    assert said == ["no CUDA graph with --use_8bit_adam (bitsandbytes keeps its step count on the host): the step "
                    "runs eagerly", "no CUDA graph with --text_encoder_lr (a captured step with two rates did not "
                    "match the eager step on GPU): the step runs eagerly"]
    assert not use_cuda_graph(config(use_8bit_adam=True), bf16, CPU, CPU, said.append) and len(said) == 2
