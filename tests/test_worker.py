import torch

from raybooth.config import TrainConfig
from raybooth.training import Loss
from raybooth.worker import LossLog, epochs_of_batches, planned_steps


def config(**overrides) -> TrainConfig:
    values = dict(model_dir="m", output_dir="o", instance_images_dir="i", instance_prompt="a photo of sks dog",
                  class_images_dir="c", class_prompt="a photo of a dog")
    return TrainConfig(**values | overrides)


class FakeShard:
    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch

    def iter_torch_batches(self, **_):
        return iter(range(self.batches_per_epoch))


def test_steps_count_across_epochs_and_stop_at_max_train_steps():
    steps = list(epochs_of_batches(FakeShard(3), config(num_epochs=4, max_train_steps=7), torch.device("cpu")))
    assert [(step, epoch) for step, epoch, _ in steps] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2)]
    assert len(list(epochs_of_batches(FakeShard(3), config(num_epochs=2), torch.device("cpu")))) == 6


def test_planned_steps_follow_the_equal_split_over_workers():
    # 200 pairs over 2 workers: 100 rows each, batches of 4: 25 steps an epoch.
    assert planned_steps(config(num_epochs=4, max_train_steps=800, train_batch_size=4), 200, 2) == 100
    assert planned_steps(config(num_epochs=4, max_train_steps=30, train_batch_size=4), 200, 2) == 30


def test_loss_log_keeps_every_step_and_reports_the_window_mean():
    log = LossLog(total_steps=4, world_size=1, verbose=False)
    for step, value in enumerate([4.0, 2.0, 1.0, 3.0], start=1):
        log.add(step, 0, Loss(torch.tensor(value), torch.tensor(value / 2), torch.tensor(value / 2)))
        if step % 2 == 0:
            metrics = log.flush()
    assert [row["loss"] for row in log.history] == [4.0, 2.0, 1.0, 3.0]
    assert metrics == {"step": 4, "epoch": 1, "loss": 2.0, "instance_loss": 1.0, "prior_loss": 1.0}
    assert log.flush()["step"] == 4  # nothing pending: the last window again
