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

