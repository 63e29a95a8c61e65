"""The step as the worker's loop calls it: the attention kernels training uses."""

import torch

from raybooth.stepping import train_with_flash_attention


def test_training_on_a_gpu_turns_cudnn_attention_off_and_leaves_cpu_alone(monkeypatch):
    switched = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", switched.append)
    train_with_flash_attention(torch.device("cpu"))
    assert switched == []
    train_with_flash_attention(torch.device("cuda", 0))
    assert switched == [False]
