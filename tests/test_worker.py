import torch
from helpers import config

from raybooth.terminal.log import clock_start
from raybooth.train.loss import Loss
from raybooth.train.losslog import LossLog
from raybooth.train.plan import TrainPlan
from raybooth.train.policy import uses_channels_last


def plan(pairs_per_worker: int, **settings) -> TrainPlan:
    return TrainPlan(config=config(**settings), model_dir="m", resolution=64, class_images_dir="c", class_shares=[],
                     pairs_per_worker=pairs_per_worker, output_partial="p", output_token="t")


def test_workers_stamp_their_lines_on_the_commands_clock_not_from_when_training_was_planned():
    # The driver's lines count from the command's start; a plan made seconds later (after the
    # driver's imports) must not start the workers' clock anew, or their lines seem seconds early.
    assert plan(1).started_at == clock_start()


def test_planned_steps_follow_each_workers_share():
    # 200 class images over 2 workers: 100 pairs each, batches of 4: 25 steps an epoch.
    assert plan(100, num_epochs=4, max_train_steps=800, train_batch_size=4).total_steps() == 100
    assert plan(100, num_epochs=4, max_train_steps=30, train_batch_size=4).total_steps() == 30
    assert plan(5, num_epochs=2, train_batch_size=2).total_steps() == 6  # the last batch is topped up


def test_loss_log_keeps_every_step_and_reports_the_window_mean():
    log = LossLog(total_steps=4, world_size=1, images_per_step=2, verbose=False)
    for step, value in enumerate([4.0, 2.0, 1.0, 3.0], start=1):
        log.add(step, 0, Loss(torch.tensor(value), torch.tensor(value / 2), torch.tensor(value / 2)))
        if step % 2 == 0:
            metrics = log.flush()
    assert [row["loss"] for row in log.history] == [4.0, 2.0, 1.0, 3.0]
    assert metrics == {"step": 4, "epoch": 1, "loss": 2.0, "instance_loss": 1.0, "prior_loss": 1.0}
    assert log.flush()["step"] == 4  # nothing pending: the last window again


def test_the_unet_is_channels_last_by_default_on_one_gpu_at_batch_1_for_full_fine_tuning():
    assert uses_channels_last(config(), "cuda", world_size=1)
    assert not uses_channels_last(config(), "cpu", world_size=1)  # the CPU path stays as it was
    assert not uses_channels_last(config(train_batch_size=4), "cuda", world_size=1)  # measured slower at 4+4
    assert not uses_channels_last(config(use_lora=True), "cuda", world_size=1)
    assert not uses_channels_last(config(), "cuda", world_size=2)  # not measured under DDP
    assert uses_channels_last(config(channels_last=True), "cpu", world_size=2)
    assert not uses_channels_last(config(channels_last=False), "cuda", world_size=1)
