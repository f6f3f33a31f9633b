"""Small networks for low-dimensional targets: time-conditioned MLPs with smooth activations
(SiLU, so second derivatives, needed by energies and critics, are non-zero)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .sde import time_tensor

__all__ = ["FourierTime", "TimeMLP"]


class FourierTime(nn.Module):
    """Fixed random Fourier features of ``t: [B]`` -> ``[B, dim]``."""

    def __init__(self, dim: int = 32, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freq", torch.randn(dim // 2, generator=torch.Generator().manual_seed(0)) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * t[:, None].to(self.freq.dtype) * self.freq[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class TimeMLP(nn.Module):
    """``(x: [B, d], t: [B]) -> [B, out_dim]`` (``out_dim=None``: same as ``d``; ``out_dim=1``
    returns ``[B]``, a scalar field such as an energy or a critic).

    Args:
        dim: input dimension ``d``.
        hidden: width; depth: number of hidden layers.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, out_dim: int | None = None, time_dim: int = 32):
        super().__init__()
        self.dim, self.out_dim = dim, dim if out_dim is None else out_dim
        self.time = FourierTime(time_dim)
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, self.out_dim))
        self.net = nn.Sequential(*layers)

    def net_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``self.net`` reads, ``[B, dim + time_dim]``: the flattened ``x`` and the features of ``t [B]``."""
        return torch.cat([x.reshape(x.shape[0], -1), self.time(t).to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = time_tensor(t, x, batch=x.shape[0])
        h = self.net(self.net_input(x, t))
        if self.out_dim == 1:
            return h[:, 0]
        return h.reshape(x.shape) if h.shape[1] == x[0].numel() else h
