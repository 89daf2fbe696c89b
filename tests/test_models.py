"""Model construction and seeding."""

import torch

from task.models import seed_torch


def test_seed_torch_gives_the_stream_of_torch_manual_seed():
    torch.manual_seed(123)
    expected = (torch.randn(1000), torch.rand(10), torch.randperm(50))
    seed_torch(123)
    got = (torch.randn(1000), torch.rand(10), torch.randperm(50))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
