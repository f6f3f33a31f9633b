"""Shared test fixtures: seeded generators (every random draw in the suite is reproducible) and one
torch thread.

Threads: the suite's tensors are small, and on a shared 2-core machine torch's intra-op threads contend
with other processes. Measured on the foundation tests (tests/test_{sde,toy,parametrisation,sampling,dsm}.py,
load average ~8): 28 s wall / 20 s CPU with one thread, 320 s wall / 129 s CPU with the default two.
An explicit OMP_NUM_THREADS in the environment is respected.
"""
import os
import socket

import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Seed torch's global generator before every test (for code paths that draw without a generator)."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen():
    """A fresh ``torch.Generator`` seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture
def attention_unet():
    """A factory of small diffusers ``UNet2DModel``s with attention in a down block, an up block and the mid block
    (8x8, channels (16, 32), 3 image channels by default), built after ``torch.manual_seed(0)``."""
    def make(sample_size: int = 8, channels: int = 3):
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                           block_out_channels=(16, 32), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return make
