"""Checkpoints written while training goes on: the snapshot is a copy (later steps do not leak
into it), and it is written in place on local storage, or into scratch and uploaded elsewhere."""

from pathlib import Path

import pyarrow.fs
import ray.train
import torch

from raybooth.files.checkpoints import OPTIMIZER, STATE, TRAINED, checkpoint_name, complete_checkpoints, read_state
from raybooth.models.loading import load_for_training
from raybooth.train.checkpoint_writer import CheckpointWriter, fits_beside, write_to_storage
from raybooth.train.checkpoints import restore, snapshot, snapshot_bytes
from raybooth.train.optim import make_optimizer

CPU = torch.device("cpu")


def trained(tiny_model_dir):
    models = load_for_training(tiny_model_dir, CPU, CPU, torch.float32, True)
    optimizer = make_optimizer(models.trainable_parameters(), 1e-3)
    for parameter in models.trainable_parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    return models, optimizer


def test_a_snapshot_keeps_the_state_of_its_step_while_training_goes_on(tiny_model_dir, tmp_path):
    models, optimizer = trained(tiny_model_dir)
    history = [{"step": 1, "loss": 0.5}]
    state = snapshot(0, models, optimizer, 1, history, {"next": 1}, {"num_workers": 1})
    before = [parameter.detach().clone() for parameter in models.trainable_parameters()]
    optimizer.step()  # training goes on: weights, AdamW's moments and the history change
    history.append({"step": 2, "loss": 0.4})
    storage = ray.train.RunConfig(name="run", storage_path=str(tmp_path)).storage_context  # as a worker gets it
    persisted = write_to_storage(storage, None, "step-0000001", 0, state)

    folder = tmp_path / "run" / "step-0000001"
    assert Path(persisted.path) == folder
    assert {TRAINED, OPTIMIZER, STATE, "rng-0.pt"} <= {p.name for p in folder.iterdir()}
    assert read_state(folder)["history"] == [{"step": 1, "loss": 0.5}]
    fresh, fresh_optimizer = trained(tiny_model_dir)
    restore(folder, 0, fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.trainable_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, models.trainable_parameters()))


def test_on_cloud_storage_the_snapshot_goes_to_scratch_and_is_uploaded(tiny_model_dir, tmp_path):
    models, optimizer = trained(tiny_model_dir)
    # Ray Train's own storage context over a filesystem that is not the local one, as S3's or GCS's
    # is not: a pyarrow filesystem rooted at a folder here stands in for the bucket.
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    storage = ray.train.RunConfig(name="run", storage_path="runs", storage_filesystem=pyarrow.fs.SubTreeFileSystem(
        str(bucket), pyarrow.fs.LocalFileSystem())).storage_context
    assert storage.storage_filesystem.type_name != "local"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    state = snapshot(1, models, optimizer, 3, [], {}, {})  # rank 1: its random state alone
    persisted = write_to_storage(storage, ray.train.Checkpoint.from_directory(scratch), "step-0000003", 1, state)

    uploaded = bucket / "runs" / "run" / "step-0000003"
    assert [p.name for p in scratch.iterdir()] == ["rng-1.pt"]  # written into scratch...
    assert [p.name for p in uploaded.iterdir()] == ["rng-1.pt"]  # ... and uploaded into the run's storage
    assert (uploaded / "rng-1.pt").read_bytes() == (scratch / "rng-1.pt").read_bytes()
    assert persisted.filesystem is storage.storage_filesystem and persisted.path == "runs/run/step-0000003"


def test_reports_hold_back_while_a_checkpoint_is_being_written_and_resume_after():
    writer = CheckpointWriter(0, {}, lambda message: None)
    assert not writer.writing()  # no checkpoint yet
    writer.device = CPU  # what save() sets, with the write handed to Ray Train's upload thread
    writer.written.clear()
    assert writer.writing() and writer.writing()
    writer.written.set()  # the upload thread is done
    assert not writer.writing()
    assert writer.device is None  # later reports need no all-reduce until the next checkpoint


def test_the_snapshot_size_counts_weights_and_adamw_moments(tiny_model_dir):
    models, optimizer = trained(tiny_model_dir)
    weights = sum(p.numel() * p.element_size() for p in models.trainable_parameters())
    size = snapshot_bytes(models, optimizer)
    assert 3 * weights <= size <= 3 * weights + 64 * len(list(models.trainable_parameters()))  # + AdamW's step counts
    assert not fits_beside(models, optimizer)  # on a CPU the copy goes to host memory as ever


def test_a_snapshot_on_the_device_is_a_copy_too(tiny_model_dir):
    models, optimizer = trained(tiny_model_dir)
    state = snapshot(0, models, optimizer, 1, [], {}, {}, on_device=True)
    name, tensor = next(iter(state["trained"].items()))
    original = dict(models.unet.named_parameters())[name.removeprefix("unet.")]
    assert torch.equal(tensor, original) and tensor.data_ptr() != original.data_ptr()


def test_in_local_mode_checkpoints_go_to_the_run_folder_and_the_oldest_beyond_the_limit_are_removed(
        tiny_model_dir, tmp_path):
    # Ray Train's local mode keeps no checkpoints: the writer puts them where a re-run looks.
    models, optimizer = trained(tiny_model_dir)
    writer = CheckpointWriter(0, {}, lambda message: None, local_run_dir=tmp_path, keep=2)
    for step in (6, 12, 18):
        writer.write_locally(checkpoint_name(step), snapshot(0, models, optimizer, step, [], {}, {"num_workers": 1}))
    assert [folder.name for folder in complete_checkpoints(tmp_path)] == ["step-0000012", "step-0000018"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000012", "step-0000018"]
