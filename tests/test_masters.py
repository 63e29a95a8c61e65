"""bf16 working weights over fp32 masters: the updates land in the masters, a step matches the
fp32 step on the same gradients, and checkpoints and the saved weights are the masters."""

import pytest
import torch
from helpers import config, fixed_batch, train_briefly, weights
from safetensors.torch import load_file

from raybooth.errors import RayboothError
from raybooth.models.loading import load_for_training, save_trained_modules
from raybooth.train.checkpoints import restore, trained_tensors, write_checkpoint
from raybooth.train.loss import dreambooth_loss
from raybooth.train.masters import MasterWeights, train_bf16_weights
from raybooth.train.optim import build_optimization, make_optimizer
from raybooth.train.precision import Precision
from raybooth.train.step import train_step

CPU = torch.device("cpu")


def layer(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    module = torch.nn.Linear(64, 64)
    with torch.no_grad():
        module.weight.normal_(0, 0.02)  # a pretrained weight's typical scale
    return module


def bf16_gradients(module: torch.nn.Module, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=generator).to(torch.bfloat16) for p in module.parameters()]


def test_the_masters_keep_updates_that_bf16_weights_would_round_away():
    module = layer()
    initial = module.weight.detach().clone()
    masters = MasterWeights(list(module.parameters()))
    optimizer = make_optimizer(masters.masters, lr=5e-6, weight_decay=0.0)
    for step in range(3):
        for parameter, gradient in zip(module.parameters(), bf16_gradients(module, step)):
            parameter.grad = gradient
        masters.step(optimizer, max_grad_norm=1e9)
        optimizer.zero_grad(set_to_none=True)
    master = masters.masters_of([module.weight])[0]
    assert master.dtype == torch.float32 and module.weight.dtype == torch.bfloat16
    assert (master != initial).float().mean() > 0.99  # every update applied, in fp32
    assert (module.weight.float() != initial.to(torch.bfloat16).float()).float().mean() < 0.5  # most too small for bf16
    assert torch.equal(module.weight, master.to(torch.bfloat16))  # the working copy follows the masters
    assert all(p.grad is None for p in module.parameters())  # the step leaves no bf16 gradients behind


def test_a_step_over_masters_is_the_fp32_step_on_the_same_gradients():
    fp32, bf16 = layer(), layer()
    masters = MasterWeights(list(bf16.parameters()))
    plain, over_masters = make_optimizer(list(fp32.parameters()), lr=1e-3), make_optimizer(masters.masters, lr=1e-3)
    for step in range(3):
        for module in (fp32, bf16):
            for parameter, gradient in zip(module.parameters(), bf16_gradients(module, step)):
                parameter.grad = gradient.to(parameter.dtype)
        plain.step()
        masters.step(over_masters, max_grad_norm=1e9)
        for optimizer in (plain, over_masters):
            optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(fp32.parameters(), masters.masters))


def test_bf16_weights_compute_without_autocast_and_give_the_mixed_precision_loss(tiny_model_dir):
    """Over masters the modules compute in bf16 without autocast (whose fp32 norms cost a cast
    back each): the loss on a fixed batch is autocast's over fp32 weights within bf16's rounding,
    and the gradients are born bf16."""
    batch, losses = fixed_batch(tiny_model_dir), []
    for bf16_weights in (False, True):
        models, precision = load_for_training(tiny_model_dir, CPU, CPU, torch.bfloat16, True), Precision("bf16", CPU)
        if bf16_weights:
            train_bf16_weights(models, precision)
        torch.manual_seed(0)
        with precision.autocast():
            assert torch.is_autocast_enabled("cpu") is not bf16_weights
            loss = dreambooth_loss(models, batch, prior_loss_weight=1.0)
        loss.total.backward()
        losses.append(loss.total.item())
        grad_dtypes = {p.grad.dtype for p in models.trainable_parameters() if p.grad is not None}
        assert grad_dtypes == {torch.bfloat16 if bf16_weights else torch.float32}
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_checkpoints_and_the_saved_weights_hold_the_masters(tiny_model_dir, tmp_path):
    cfg = config(lr=1e-3, bf16_gradients=True, mixed_precision="bf16")
    torch.manual_seed(0)
    models = load_for_training(tiny_model_dir, CPU, CPU, torch.bfloat16, True)
    batch, precision = fixed_batch(tiny_model_dir), Precision("bf16", CPU)
    train_bf16_weights(models, precision)
    optimization = build_optimization(models, cfg, 2)
    for _ in range(2):
        loss = train_step(models, optimization.optimizer, precision, batch, 1.0, 1.0)
        optimization.optimizer.zero_grad(set_to_none=True)
        optimization.after_step()
    assert torch.isfinite(loss.total)
    assert all(p.dtype == torch.bfloat16 for p in models.trainable_parameters())
    masters = trained_tensors(models)
    assert all(t.dtype == torch.float32 for t in masters.values())

    write_checkpoint(tmp_path / "checkpoint", 0, models, optimization, 2, [], {}, {})
    resumed = load_for_training(tiny_model_dir, CPU, CPU, torch.bfloat16, True)
    resumed.masters = MasterWeights(resumed.trainable_parameters())
    restore(tmp_path / "checkpoint", 0, resumed, build_optimization(resumed, cfg, 2))
    assert all(torch.equal(a, b) for a, b in zip(trained_tensors(resumed).values(), masters.values()))
    assert all(torch.equal(p, m.to(torch.bfloat16))  # the working copy came back with them
               for p, m in zip(resumed.trainable_parameters(), trained_tensors(resumed).values()))

    optimization.finish()  # the modules take their fp32 masters back, to be saved
    save_trained_modules(models, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[name.removeprefix("unet.")], tensor)
               for name, tensor in masters.items() if name.startswith("unet."))


@pytest.mark.parametrize("flags, precision, bf16_gradients", [
    ([], "no", False),  # a CPU trains in full precision: there are no bf16 weights to train
    (["--mixed_precision", "bf16", "--bf16_gradients"], "bf16", True),
    (["--mixed_precision", "bf16", "--train_batch_size", "4"], "bf16", True),
    (["--mixed_precision", "bf16", "--train_batch_size", "4", "--no_bf16_gradients"], "bf16", False),
], ids=["cpu-default", "asked-for", "batch-4-default", "refused-at-batch-4"])
def test_a_run_trains_bf16_weights_over_masters_as_its_flag_or_default_says_and_records_it(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys, flags, precision, bf16_gradients):
    code, log, record = train_briefly(tiny_model_dir, subject_dir, tmp_path, capsys, *flags)
    assert code == 0, log
    assert (record["mixed_precision"], record["bf16_gradients"]) == (precision, bf16_gradients)
    assert ("bf16 weights over fp32 masters" in log) == bf16_gradients  # the worker's set-up line
    assert {tensor.dtype for tensor in weights(tmp_path / "tuned", "unet").values()} == {torch.float32}  # the masters


def test_bf16_gradients_without_bf16_mixed_precision_fail_in_one_clear_line(ray_cluster, tiny_model_dir, subject_dir,
                                                                             tmp_path, capsys):
    code, log, _ = train_briefly(tiny_model_dir, subject_dir, tmp_path / "no", capsys, "--mixed_precision", "no",
                                 "--bf16_gradients")
    assert code == 1 and log.strip() == "raybooth: error: --bf16_gradients does not go with --mixed_precision no"
    # --mixed_precision auto is full precision on a CPU, which only the worker knows.
    code, log, _ = train_briefly(tiny_model_dir, subject_dir, tmp_path / "auto", capsys, "--bf16_gradients")
    assert code == 1
    assert log.strip().splitlines()[-1] == ("raybooth: error: --bf16_gradients needs bf16 mixed precision; "
                                            "this worker's is no")
    assert not (tmp_path / "no" / "tuned").exists() and not (tmp_path / "auto" / "tuned").exists()


@pytest.mark.parametrize("clash, flag", [(dict(use_lora=True), "--use_lora"), (dict(use_ema=True), "--use_ema"),
                                         (dict(use_8bit_adam=True), "--use_8bit_adam"),
                                         (dict(mixed_precision="fp16"), "--mixed_precision fp16")])
def test_bf16_gradients_asked_for_with_an_option_that_rules_them_out_is_one_clear_error(clash, flag):
    with pytest.raises(RayboothError, match=f"--bf16_gradients does not go with {flag}"):
        config(bf16_gradients=True, **clash).validate()
