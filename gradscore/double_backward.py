"""Differentiating a scalar field with respect to its input, safely for training.

The energy parametrisation (``score = -grad_x E``), critics (``grad_x psi``) and the asymmetry
penalty all need ``autograd.grad(..., create_graph=True)`` followed by the usual backward (a
double backward). Measured pitfalls (ENGINEERING.md) handled here:

* The gradient is taken *inside* the module's ``forward`` so DDP sees one ordinary graph.
* The caller's tensor is never mutated: a detached copy is differentiated (unless the caller's
  tensor already requires grad, in which case it is used as is so higher derivatives flow).
* PyTorch's fused SDPA kernels have no double backward; ``math_attention()`` selects the plain
  math kernel, which does.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["input_gradient", "math_attention"]


def math_attention():
    """Context manager routing ``scaled_dot_product_attention`` to the math kernel (double-backward safe)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def input_gradient(scalar_fn, x: torch.Tensor, *args, create_graph: bool | None = None):
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
