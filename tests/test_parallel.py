"""DDP as the training step uses it: gradients as views of the all-reduce buckets, the bucket
size asked for, the same gradients as without DDP, and unwrap."""

import pytest
import torch
import torch.distributed as dist

from raybooth.models.modules import unwrap
from raybooth.train.parallel import wrap


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradients_are_bucket_views_and_match_the_plain_module(process_group):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    copy = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    copy.load_state_dict(plain.state_dict())
    ddp = wrap(copy, bucket_mb=3)
    assert ddp.gradient_as_bucket_view and ddp.bucket_bytes_cap == 3 * 1024 * 1024
    assert unwrap(ddp) is copy and unwrap(plain) is plain
    inputs = torch.randn(5, 8)
    for _ in range(2):  # the second step starts from gradients set to None, as the optimizer leaves them
        for module in (plain, ddp):
            for parameter in module.parameters():
                parameter.grad = None
            module(inputs).square().mean().backward()
        for expected, parameter in zip(plain.parameters(), copy.parameters()):
            torch.testing.assert_close(parameter.grad, expected.grad)
