"""Training state that outlives a lost worker, a lost node or a Ctrl-C: the trained weights,
the optimizer, the step, the loss history, and each worker's place in its data and random
streams, so that a resumed run takes exactly the steps an uninterrupted one would have taken.

Rank 0 writes what all workers share (weights, optimizer, history); every rank writes its own
random state. Ray Train gathers the ranks' files into one checkpoint folder on its storage."""

from __future__ import annotations

import json
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from raybooth.files.checkpoints import OPTIMIZER, STATE, TRAINED, changed_flags, check_settings, read_state
from raybooth.files.writes import write_whole
from raybooth.train.losslog import LossLog
from raybooth.train.plan import TrainPlan


def trained_tensors(models) -> dict[str, torch.Tensor]:
    """Every trained parameter (full weights, or only LoRA adapters), by module-qualified name;
    with --bf16_gradients their fp32 masters, which are what training steps."""
    from raybooth.models.modules import unwrap

    named = {f"{prefix}.{name}": parameter
             for prefix, module in {"unet": models.unet, **models.text_encoders()}.items()  # those not freed
             for name, parameter in unwrap(module).named_parameters() if parameter.requires_grad}
    tensors = models.masters.masters_of(list(named.values())) if models.masters is not None else named.values()
    return {name: tensor.detach() for name, tensor in zip(named, tensors)}


def snapshot(rank: int, models, optimizer, step: int, history: list, data_position: dict,
             settings: dict, on_device: bool = False, flags: dict | None = None) -> dict:
    """What this rank's part of a checkpoint holds, as a copy that can be written while training
    goes on and changes the originals: in host memory, or with `on_device` beside the originals
    (a GPU copies 12 GB in milliseconds; the writer then moves it to the host, tensor by tensor)."""
    device = models.device
    state = {"random": {"torch": torch.get_rng_state(), "data": data_position,
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    if rank == 0:
        state["trained"] = {name: copy_state(tensor.contiguous(), on_device)
                            for name, tensor in trained_tensors(models).items()}
        state["optimizer"] = copy_state(optimizer.state_dict(), on_device)
        state["state"] = {"step": step, "history": list(history), "settings": settings, "flags": flags or {}}
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies were queued without waiting
    return state


def snapshot_bytes(models, optimizer) -> int:
    """The size of rank 0's snapshot: the trained tensors and the optimizer's state."""
    tensors = [*trained_tensors(models).values(), *tensors_in(optimizer.state_dict())]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def tensors_in(value):
    """The tensors of a state dict (nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def copy_state(value, on_device: bool = False):
    """A copy of a state dict (nested dicts, lists, tuples) whose tensors live in host memory, or
    with `on_device` where they are. GPU tensors go to page-locked host memory, queued without
    waiting. Pinning SD-1.5's 12 GB took as long as copying into fresh pageable memory (9 s on an
    H100's host), but PyTorch keeps the pinned memory for the next checkpoint, whose copy took 0.2 s."""
    if isinstance(value, torch.Tensor):
        if on_device or value.device.type != "cuda":
            return value.detach().clone()
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        return host.copy_(value, non_blocking=True)
    if isinstance(value, dict):
        return {key: copy_state(item, on_device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(item, on_device) for item in value)
    return value


def write_snapshot(folder: Path, rank: int, state: dict) -> None:
    """Each file whole or not at all: written under a temporary name, then renamed, the state
    (which marks the checkpoint as one) after the weights and the optimizer. A write cut short at
    any moment leaves files out, and files/checkpoints.is_complete skips the checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "trained" in state:
        write_whole(folder / TRAINED, lambda path: save_file(state["trained"], path))
        write_whole(folder / OPTIMIZER, lambda path: torch.save(state["optimizer"], path))
        write_whole(folder / STATE, lambda path: path.write_text(json.dumps(state["state"])))
    write_whole(folder / f"rng-{rank}.pt", lambda path: torch.save(plain(state["random"]), path))


def plain(value):
    """Python's own numbers in place of numpy's (the data order's indices may be numpy integers),
    so that the random state loads with torch.load(weights_only=True): data, never code."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


def write_checkpoint(folder: Path, rank: int, models, optimizer, step: int, history: list,
                     data_position: dict, settings: dict, flags: dict | None = None) -> None:
    write_snapshot(folder, rank, snapshot(rank, models, optimizer, step, history, data_position, settings,
                                          flags=flags))


def restore(folder: Path, rank: int, models, optimizer) -> tuple[int, list, dict]:
    """Load a checkpoint into the models and `optimizer` (a torch optimizer, or optim.Optimization
    with its schedule and EMA: anything with state_dict/load_state_dict); returns (step, history,
    data position)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_state(folder)
    saved = load_file(folder / TRAINED)
    with torch.no_grad():
        for name, tensor in trained_tensors(models).items():
            tensor.copy_(saved[name])
    if models.masters is not None:
        models.masters.push()
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location=models.device, weights_only=True))
    match_layouts(getattr(optimizer, "optimizer", optimizer))
    random_state = torch.load(folder / f"rng-{rank}.pt", weights_only=True)  # a checkpoint must not run code
    torch.set_rng_state(random_state["torch"])
    if random_state["cuda"] is not None:
        torch.cuda.set_rng_state(random_state["cuda"], models.device)
    return state["step"], state["history"], random_state["data"]


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state its parameters' memory layout, as fresh state has: a checkpoint
    written with the other --channels_last holds the UNet's moments in the other layout."""
    with torch.no_grad():
        for parameter, state in optimizer.state.items():
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                        and value.stride() != parameter.stride()):
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def resume(plan: TrainPlan, rank: int, models, optimizer, losses: LossLog, say) -> tuple[int, dict | None]:
    """(steps already taken, data position) from the run's latest checkpoint, which Ray Train
    hands over after a worker or node was lost or when the same command runs again, else from
    the plan's; (0, None) for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and plan.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(plan.resume_from)
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as folder:
        if read_state(Path(folder)) is None:  # a finished run's final weights: nothing to continue
            return 0, None
        check_settings(Path(folder), plan.settings)
        changed = changed_flags(Path(folder), plan.flags) if plan.resume_from is None else []  # else said already
        step, losses.history, position = restore(Path(folder), rank, models, optimizer)
    say(f"resumed at step {step} from the checkpoint {checkpoint.path}"
        + (f", with changed settings, which take effect now: {', '.join(changed)}" if changed else ""))
    return step, position
