"""Differentiating a scalar field with respect to its input, safely for training.

The energy parametrisation (``score = -grad_x E``), critics (``grad_x psi``) and the asymmetry
penalty all need ``autograd.grad(..., create_graph=True)`` followed by the usual backward (a
double backward). The pitfalls handled here (docs/engineering.md, "Double backward" and "Attention"):

* The gradient is taken *inside* the module's ``forward`` so DDP sees one ordinary graph.
* The caller's tensor is never mutated: a detached copy is differentiated (unless the caller's
  tensor already requires grad, in which case it is used as is so higher derivatives flow).
* PyTorch's fused SDPA kernels have no double backward; ``math_attention()`` selects the plain
  math kernel, which does.
* Memory of the second-order graph: under ``create_graph`` PyTorch records SiLU's derivative as a
  chain of elementwise operations (sigmoid, products, sums), each saving an activation-sized
  intermediate. ``compact_silu(module)`` swaps a module's ``nn.SiLU`` for ``CompactSiLU``: the same
  forward (``F.silu``) and first derivative (``silu_backward``), but that derivative is one autograd
  node saving only its two inputs, with SiLU's second derivative written out for the backward
  (tests/test_fast_paths.py; the memory saved: BENCHMARKS.md, "Fast paths tried").
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["input_gradient", "math_attention", "CompactSiLU", "compact_silu"]


class _SiLUDerivative(torch.autograd.Function):
    """``g * silu'(x)`` (what SiLU's backward computes), differentiable in ``g`` and ``x`` with one
    node that saves ``(g, x)``: ``silu'(x) = s (1 + x (1 - s))``, ``silu''(x) = s (1 - s) (2 + x (1 - 2 s))``,
    ``s = sigmoid(x)``."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return torch.ops.aten.silu_backward(g, x)

    @staticmethod
    def backward(ctx, gg):
        g, x = ctx.saved_tensors
        s = torch.sigmoid(x)
        # aten's silu_backward has no derivative of its own: apply this Function again (higher orders)
        return _SiLUDerivative.apply(gg, x), gg * g * s * (1 - s) * (2 + x * (1 - 2 * s))


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return F.silu(x)

    @staticmethod
    def jvp(ctx, x_t):                          # forward-mode AD (torch.func.jvp, forward_ad)
        (x,) = ctx.saved_tensors
        return _SiLUDerivative.apply(x_t, x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _SiLUDerivative.apply(g, x)


class CompactSiLU(nn.SiLU):
    """``nn.SiLU`` whose derivative, when differentiated again, holds only its inputs (see the module
    docstring). Forward and first derivative are PyTorch's own kernels (``silu``, ``silu_backward``:
    bitwise ``nn.SiLU`` outside ``create_graph``, where PyTorch switches to a composite expression);
    under ``create_graph`` and for the second derivative it agrees with PyTorch to rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SiLU.apply(x)


def compact_silu(module: nn.Module) -> int:
    """Turn every plain ``nn.SiLU`` inside ``module`` into a ``CompactSiLU`` in place (same
    parameters and state dict; ``F.silu`` called directly in a ``forward`` is left as it is).
    Returns how many were converted."""
    n = 0
    for m in module.modules():
        if type(m) is nn.SiLU and not m.inplace:
            m.__class__ = CompactSiLU
            n += 1
    return n


def math_attention() -> contextlib.AbstractContextManager:
    """Context manager routing ``scaled_dot_product_attention`` to the math kernel (double-backward safe)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def input_gradient(scalar_fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any,
                   create_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x sum_b scalar_fn(x)[b], scalar_fn(x))``.

    Args:
        scalar_fn: callable ``(x, *args) -> [B]`` (one scalar per sample).
        x: input ``[B, *D]``; not modified.
        create_graph: keep the graph of the gradient (needed to train through it). Default: whether
            grad mode is on at the call, so sampling under ``torch.no_grad()`` builds no graph.
    Returns:
        ``(grad [B, *D], value [B])``. With ``create_graph`` every parameter the value depends on
        receives a gradient through ``grad`` (an exact zero where ``grad`` does not depend on it), so a
        DDP-wrapped module that returns ``grad`` works without ``find_unused_parameters``.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        with math_attention():
            value = scalar_fn(xg, *args)
        if value.shape != (x.shape[0],):
            raise ValueError(
                f"scalar field must return one value per sample, shape [{x.shape[0]}], got {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value.sum(), xg, create_graph=create_graph)
    if not create_graph:
        return grad.detach(), value.detach()
    # Parameters that shift the field by a constant in x (the last bias of a scalar head) get no gradient
    # through grad_x; DDP then fails on the next step ("Expected to have finished reduction"). A
    # zero-weighted value term gives them an exact zero gradient instead of None.
    return grad + 0.0 * value.reshape(-1, *([1] * (x.dim() - 1))), value
