"""Differentiating a scalar field with respect to its input, safely for training.

The energy parametrisation (``score = -grad_x E``), critics (``grad_x psi``) and the asymmetry
penalty all need ``autograd.grad(..., create_graph=True)`` followed by the usual backward (a
double backward). The pitfalls handled here (docs/engineering.md, "Double backward" and "Attention"):

* The gradient is taken *inside* the module's ``forward`` so DDP sees one ordinary graph.
* The caller's tensor is never mutated: a detached copy is differentiated (unless the caller's
  tensor already requires grad, in which case it is used as is so higher derivatives flow).
* PyTorch's fused SDPA kernels have no double backward; ``math_attention()`` selects the plain
  math kernel, which does. Its second-order backward holds several tensors the size of the attention
  scores at once. Under ``math_attention(chunk_bytes)`` (``EnergyScore`` and ``Critic`` enter it for a backbone
  with attention, ``attention_chunk_bytes``) a plain call goes to ``twice_differentiable_attention`` instead (fused
  forward, attention's second derivative written out, docs/theory.md section 10.1, probabilities recomputed on
  chunk-sized slices) and a masked one runs on slices of the batch.
* Memory of the second-order graph: under ``create_graph`` PyTorch records SiLU's derivative as a
  chain of elementwise operations (sigmoid, products, sums), each saving an activation-sized
  intermediate. ``compact_silu(module)`` swaps a module's ``nn.SiLU`` for ``CompactSiLU``: the same
  forward (``F.silu``) and first derivative (``silu_backward``), but that derivative is one autograd
  node saving only its two inputs, with SiLU's second derivative written out for the backward
  (tests/test_fast_paths.py; the memory saved: BENCHMARKS.md, "Fast paths tried").
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["input_gradient", "math_attention", "attention_chunk_bytes", "ATTENTION_CHUNK_BYTES", "CompactSiLU",
           "compact_silu", "twice_differentiable_attention", "silu_mlp_input_gradient", "silu_mlp_vjp",
           "time_mlp_layers"]


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
        # aten's silu_backward has no derivative of its own: apply this Function again (higher orders)
        grad_g = _SiLUDerivative.apply(gg, x)
        if torch.is_grad_enabled():             # create_graph: a third derivative follows, keep it differentiable
            s = torch.sigmoid(x)
            return grad_g, gg * g * s * (1 - s) * (2 + x * (1 - 2 * s))
        return grad_g, _silu2_times(gg * g, x)  # the same product in place: two activation-sized transients, not ~6


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


def _plain_grads(outputs, inputs, needed, grad_outputs) -> list:
    """Gradients of ``outputs`` (a differentiable graph) along ``grad_outputs`` for the ``inputs`` whose ``needed``
    flag is set, with ``create_graph`` (a custom node's backward under grad mode: the caller differentiates again);
    ``None`` for the others, an exact zero for a needed input the graph does not reach."""
    wanted = [i for i, need in enumerate(needed) if need]
    found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs, create_graph=True,
                                allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(wanted, found):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


# ------------------------------------------------------------------------------------------------------
# Attention softmax(s q k^T) v with its first derivative as one node and its second derivative written out
# (docs/theory.md, section 10.1), instead of the math kernel's composite graph (which saves the probabilities and
# holds several score-sized tensors in its second-order backward). Per head, with P the probabilities, dO the
# output's cotangent, D = rowsum(dO * O), A = P * (dO v^T - D): dq = s A k, dk = s A^T q, dv = P^T dO. For
# cotangents (Gq, Gk, Gv) of (dq, dk, dv): Abar = s (Gq k^T + q Gk^T), R = Abar - rowsum(Abar * P),
# dPbar = P * R, Pbar = R * (dO v^T - D) + dO Gv^T, Sbar = P * (Pbar - rowsum(Pbar * P)), and
# d/ddO = dPbar v + P Gv, d/dv = dPbar^T dO, d/dq = s (Sbar k + A Gk), d/dk = s (Sbar^T q + A^T Gq).
# Score-sized tensors exist only inside a chunk of batch x heads of at most chunk_bytes.
def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``rowsum(a * b)`` of ``[n, L, M]`` tensors, ``[n, L, 1]``, without the product's tensor."""
    n, rows, m = a.shape
    return torch.bmm(a.reshape(n * rows, 1, m), b.reshape(n * rows, m, 1)).view(n, rows, 1)


def _chunks(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int | None) -> Iterator[slice]:
    """Slices of the first (batch x heads) dimension of ``[n, L_q, d]`` / ``[n, L_k, d]`` whose scores hold at most
    ``chunk_bytes`` each (at least one item; ``None``: all at once)."""
    n, per_item = q.shape[0], q.shape[1] * k.shape[1] * q.element_size()
    step = n if not chunk_bytes else max(1, min(n, chunk_bytes // max(per_item, 1)))
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def _attention_plain(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, -1) @ v


def _attention_input_grads(do, q, k, v, out, scale, chunk_bytes):
    """``(dq, dk, dv)`` of ``softmax(s q k^T) v`` for the cotangent ``do`` (``[n, L, d]`` each), in chunks."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dd = _row_dot(do, out)
    for c in _chunks(q, k, chunk_bytes):
        p = torch.softmax(torch.bmm(q[c] * scale, k[c].transpose(1, 2)), -1)     # scaled where it is small
        torch.bmm(p.transpose(1, 2), do[c], out=dv[c])
        a = torch.bmm(do[c], v[c].transpose(1, 2)).sub_(dd[c]).mul_(p)          # A = P * (dO v^T - D)
        torch.bmm(a, k[c], out=dq[c]).mul_(scale)
        torch.bmm(a.transpose(1, 2), q[c], out=dk[c]).mul_(scale)
    return dq, dk, dv


class _AttentionInputGrads(torch.autograd.Function):
    """``(do, q, k, v, out) -> (dq, dk, dv)`` as one node saving its inputs; its derivative written out (above);
    under ``create_graph`` (a third derivative) it differentiates the plain composite graph instead."""

    @staticmethod
    def forward(ctx, do, q, k, v, out, scale, chunk_bytes):
        ctx.scale, ctx.chunk_bytes = scale, chunk_bytes
        ctx.save_for_backward(do, q, k, v, out)
        return _attention_input_grads(do, q, k, v, out, scale, chunk_bytes)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        do, q, k, v, out = ctx.saved_tensors
        s = ctx.scale
        if torch.is_grad_enabled():
            qq, kk, vv = (a if a.requires_grad else a.detach().requires_grad_(True) for a in (q, k, v))
            firsts = torch.autograd.grad(_attention_plain(qq, kk, vv, s), (qq, kk, vv), do, create_graph=True)
            grads = _plain_grads(firsts, (do, q, k, v), ctx.needs_input_grad[:4], (gq, gk, gv))
            return (*grads, None, None, None)
        gdo, gqq, gkk, gvv = (torch.empty_like(a) for a in (do, q, k, v))
        dd = _row_dot(do, out)
        for c in _chunks(q, k, ctx.chunk_bytes):
            qc, kc, vc, doc = q[c], k[c], v[c], do[c]
            p = torch.softmax(torch.bmm(qc * s, kc.transpose(1, 2)), -1)
            dpd = torch.bmm(doc, vc.transpose(1, 2)).sub_(dd[c])                 # dO v^T - D
            # Abar = s (Gq k^T + q Gk^T) as one product over the concatenated head dimension
            r = torch.bmm(torch.cat([gq[c], qc], -1).mul_(s), torch.cat([kc, gk[c]], -1).transpose(1, 2))
            r.sub_(_row_dot(r, p))                                               # R
            dpbar = r * p
            pbar = r.mul_(dpd).baddbmm_(doc, gv[c].transpose(1, 2))              # Pbar (a row constant dropped)
            sbar = pbar.sub_(_row_dot(pbar, p)).mul_(p)
            a = dpd.mul_(p)                                                      # A
            torch.baddbmm(torch.bmm(p, gv[c]), dpbar, vc, out=gdo[c])
            torch.bmm(dpbar.transpose(1, 2), doc, out=gvv[c])
            torch.baddbmm(torch.bmm(sbar, kc), a, gk[c], out=gqq[c]).mul_(s)
            torch.baddbmm(torch.bmm(sbar.transpose(1, 2), qc), a.transpose(1, 2), gq[c], out=gkk[c]).mul_(s)
        return gdo, gqq, gkk, gvv, None, None, None


class _Attention(torch.autograd.Function):
    """``softmax(s q k^T) v`` on ``[n, L, d]`` tensors: the fused kernel forward, the derivative as one node."""

    @staticmethod
    def forward(ctx, q, k, v, scale, chunk_bytes):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH]
        with sdpa_kernel(backends):             # a fused kernel (the caller's context may have picked the math one)
            # [1, n, L, d]: the fused CPU kernel takes 4-D inputs only (3-D ones fall back to the math kernel)
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
        ctx.scale, ctx.chunk_bytes = scale, chunk_bytes
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out = ctx.saved_tensors
        do, out = do.contiguous(), out.detach()     # O enters the derivatives as a constant (docs/theory.md 10.1)
        if torch.is_grad_enabled():
            return (*_AttentionInputGrads.apply(do, q, k, v, out, ctx.scale, ctx.chunk_bytes), None, None)
        return (*_attention_input_grads(do, q, k, v, out, ctx.scale, ctx.chunk_bytes), None, None)


def twice_differentiable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                                   chunk_bytes: int | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, scale=scale)`` (no mask, no dropout, not causal; ``[..., L, d]``, the
    same leading shape for all three) whose first derivative is one autograd node with attention's second derivative
    written out: no score-sized tensor is saved, and the backward's score-sized temporaries hold at most
    ``chunk_bytes`` (batch x heads slices). Forward: the fused kernel; derivatives: to rounding the math kernel's."""
    lead = q.shape[:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    flat = [a.reshape(-1, *a.shape[-2:]).contiguous() for a in (q, k, v)]
    return _Attention.apply(*flat, scale, chunk_bytes).reshape(*lead, *q.shape[-2:-1], v.shape[-1])


ATTENTION_CHUNK_BYTES = 4 * 2**20
"""Default size of one chunk's attention scores under ``math_attention(chunk_bytes=...)`` (what it saves: BENCHMARKS.md,
"What limits the energy route")."""


_PLAIN_SDPA_KEYWORDS = {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}


class _ChunkedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` under a double backward. A call without mask, dropout, causality or grouped
    heads, in grad mode, float32/64 without autocast, goes to ``twice_differentiable_attention`` (with
    ``written_derivative``). Any other call runs on slices of the batch whose scores (``heads x L_q x L_k``) hold at
    most ``chunk_bytes`` each, then concatenated: the same per-sample computation, so the same values; but the
    math kernel's second-order backward (softmax's and the two products', several score-sized tensors) then runs on
    chunk-sized tensors instead of the whole batch's."""

    def __init__(self, chunk_bytes: int, written_derivative: bool = True):
        super().__init__()
        self.chunk_bytes, self.written_derivative = chunk_bytes, written_derivative

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or len(args) != 3:
            return func(*args, **kwargs)
        q, k, v = args
        if (self.written_derivative and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p")
                and not kwargs.get("is_causal") and not kwargs.get("enable_gqa") and set(kwargs) <= _PLAIN_SDPA_KEYWORDS
                and q.dim() >= 3 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and torch.is_grad_enabled()
                and q.dtype in (torch.float32, torch.float64) and q.dtype == k.dtype == v.dtype
                and not torch.is_autocast_enabled(q.device.type)):
            return twice_differentiable_attention(q, k, v, kwargs.get("scale"), self.chunk_bytes)
        batch = q.shape[0]
        per_sample = (q[0].numel() // q.shape[-1]) * k.shape[-2] * max(q.element_size(), 4)
        n = max(1, self.chunk_bytes // max(per_sample, 1))
        mask = kwargs.get("attn_mask")
        if n >= batch or q.dim() < 3 or k.shape[0] != batch or v.shape[0] != batch:
            return func(*args, **kwargs)
        out = []
        for i in range(0, batch, n):
            kw = kwargs
            if mask is not None and mask.dim() == q.dim() and mask.shape[0] == batch:
                kw = kwargs | {"attn_mask": mask[i:i + n]}
            out.append(func(q[i:i + n], k[i:i + n], v[i:i + n], **kw))
        return torch.cat(out)


@contextlib.contextmanager
def math_attention(chunk_bytes: int | None = None, written_derivative: bool = True) -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math kernel (double-backward safe). With ``chunk_bytes``, a call
    without mask, dropout or causality that is differentiated (grad mode, float32/64, no autocast) goes to
    ``twice_differentiable_attention`` instead (fused forward, derivatives written out, score-sized temporaries of at
    most ``chunk_bytes``; ``written_derivative=False`` keeps the math kernel for those too), and any other call runs
    on slices of the batch whose attention scores hold at most ``chunk_bytes`` each (``_ChunkedAttention``: the same
    values, less memory in a double backward). ``None`` leaves every call to the math kernel, whole (and costs
    nothing per operator: the mode intercepts every torch function call in the context)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mode = _ChunkedAttention(chunk_bytes, written_derivative) if chunk_bytes else contextlib.nullcontext()
    with sdpa_kernel(SDPBackend.MATH), mode:
        yield


def attention_chunk_bytes(module: nn.Module) -> int | None:
    """``ATTENTION_CHUNK_BYTES`` when ``module`` holds a diffusers ``Attention`` or an ``nn.MultiheadAttention``
    (the modules whose ``scaled_dot_product_attention`` calls ``math_attention`` can chunk), else ``None``."""
    kinds: tuple[type, ...] = (nn.MultiheadAttention,)
    try:
        from diffusers.models.attention_processor import Attention
        kinds += (Attention,)
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        pass
    return ATTENTION_CHUNK_BYTES if any(isinstance(m, kinds) for m in module.modules()) else None


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


# ------------------------------------------------------------------------------------------------------
# One fused node for the input gradient of a SiLU MLP (the toy critic, and the toy energy): with h_k = silu(a_k),
# a_k = h_{k-1} W_k^T + b_k, h_0 = u, the node returns J^T w restricted to the first d inputs (J = d h_L / d u, w the
# cotangent of h_L: the critic's head weight, or per sample for the inner-product energy) and h_L. Autograd's double
# backward of the same chain dispatches ~3x the operators (views, transposes, the zero-weighted value term, the
# composite SiLU'') for the same matmuls. tests/test_fast_paths.py checks it against autograd.
def _silu2_times(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``z * silu''(a)`` (``z`` overwritten), ``silu''(a) = s (1 - s) (2 + a (1 - 2 s))``, ``s = sigmoid(a)``."""
    s = torch.sigmoid(a)
    torch.ops.aten.sigmoid_backward.grad_input(z, s, grad_input=z)      # z s (1 - s), in place
    return z.mul_(s.mul_(-2).add_(1).mul_(a).add_(2))                   # times 2 + a (1 - 2 s)


class _SiLUMLPInputGradient(torch.autograd.Function):
    """``(u [B, D], d, w, c, W_1, b_1, ..., W_L, b_L) -> (J^T w [:, :d], h_L)``: ``[B, d]`` and ``[B, H]``, with
    the cotangent ``w`` of ``h_L`` shared (``[1, H]``, a scalar head's weight) or per sample (``[B, H]``) and ``c``
    a head bias the result does not depend on (an exact zero gradient; ``None``: none). The backward is the adjoint
    of the forward pass and of the gradient pass, written out; under ``create_graph`` (a third derivative) it
    recomputes the plain autograd graph instead."""

    @staticmethod
    def forward(ctx, u, d, w, c, *wb):
        ctx.set_materialize_grads(False)                                # an unused output's cotangent is None
        weights, biases = wb[0::2], wb[1::2]
        h, ins, acts = u, [], []
        for W, b in zip(weights, biases):
            ins.append(h)
            acts.append(torch.addmm(b, h, W.t()))                       # F.linear's kernel on [B, D]
            h = F.silu(acts[-1])
        delta, deltas = w.expand(u.shape[0], w.shape[1]), []
        for k in range(len(weights) - 1, -1, -1):
            deltas.append(delta)
            delta = torch.ops.aten.silu_backward(delta, acts[k]).mm(weights[k][:, :d] if k == 0 else weights[k])
        ctx.d, ctx.n = d, len(weights)
        # c_k = delta_k * silu'(a_k) is recomputed in the backward (one elementwise pass) rather than saved
        ctx.save_for_backward(u, w, c, *wb, *ins[1:], *acts, *deltas[:0:-1])
        return delta, h

    @staticmethod
    def backward(ctx, gbar, hLbar):
        d, n = ctx.d, ctx.n
        saved = ctx.saved_tensors
        u, w, c, wb = saved[0], saved[1], saved[2], saved[3:3 + 2 * n]
        if gbar is None:
            gbar = u.new_zeros(u.shape[0], d)
        if torch.is_grad_enabled():
            return _SiLUMLPInputGradient._recompute(ctx, gbar, hLbar, u, d, w, c, wb)
        rest = saved[3 + 2 * n:]
        weights, ins = wb[0::2], (u, *rest[:n - 1])
        acts, deltas = rest[n - 1:2 * n - 1], (*rest[2 * n - 1:3 * n - 2], w)
        gw, gb, abar2 = [None] * n, [None] * n, [None] * n
        dbar = gbar                                                     # adjoint of delta_{k-1}, k = 1..L
        for k in range(n):                                              # the gradient pass, bottom-up
            cbar = dbar.mm((weights[k][:, :d] if k == 0 else weights[k]).t())
            delta_k = deltas[k].expand(cbar.shape)
            gw[k] = torch.ops.aten.silu_backward(delta_k, acts[k]).t().mm(dbar)      # c_k^T dbar
            if k == 0 and d < u.shape[1]:
                gw[k] = F.pad(gw[k], (0, u.shape[1] - d))
            dbar = torch.ops.aten.silu_backward(cbar, acts[k])
            abar2[k] = _silu2_times(cbar.mul_(delta_k), acts[k])
        gw_top = dbar.sum(0, keepdim=True) if w.shape[0] != dbar.shape[0] else dbar   # delta_L = w
        abar, gu = abar2[n - 1], None
        if hLbar is not None:                                           # h_L used downstream (the energy's head)
            abar = abar.add_(torch.ops.aten.silu_backward(hLbar, acts[n - 1]))
        for k in range(n - 1, -1, -1):                                  # the forward pass, top-down
            abar2[k] = None                                             # held as abar only: freed at the next layer
            gw[k] = torch.addmm(gw[k], abar.t(), ins[k])
            gb[k] = abar.sum(0)
            if k > 0:
                hbar = abar.mm(weights[k])
                abar = abar2[k - 1].add_(torch.ops.aten.silu_backward.grad_input(hbar, acts[k - 1], grad_input=hbar))
            elif ctx.needs_input_grad[0]:
                gu = abar.mm(weights[0])
        gc = None if c is None else torch.zeros_like(c)
        return (gu, None, gw_top, gc, *(g for pair in zip(gw, gb) for g in pair))

    @staticmethod
    def _recompute(ctx, gbar, hLbar, u, d, w, c, wb):
        """The backward as a differentiable graph (grad mode on: the caller differentiates it again)."""
        inputs = (u, w, c, *wb)
        needed = [ctx.needs_input_grad[i + (i > 0)] for i in range(len(inputs))]     # input 1 is d, an int
        outs = _silu_mlp_input_gradient_plain(u, d, w, c, wb)
        used = [(o, g) for o, g in zip(outs, (gbar, hLbar)) if g is not None]
        grads = _plain_grads([o for o, _ in used], inputs, needed, [g for _, g in used])
        return (grads[0], None, *grads[1:])


def _silu_mlp_input_gradient_plain(u, d, w, c, wb):
    """What ``_SiLUMLPInputGradient`` computes, with autograd (the reference of the tests): ``(J^T w [:, :d], h_L)``."""
    uu = u if u.requires_grad else u.detach().requires_grad_(True)
    h = uu
    for W, b in zip(wb[0::2], wb[1::2]):
        h = F.silu(F.linear(h, W, b))
    (g,) = torch.autograd.grad((h * w).sum(), uu, create_graph=True)
    return g[:, :d], h


def silu_mlp_input_gradient(u: torch.Tensor, d: int, linears: list[nn.Linear], head: nn.Linear) -> torch.Tensor:
    """``grad_u psi~(u)[:, :d]``, ``[B, d]``, of the scalar MLP ``psi~ = head(silu(... silu(linears[0](u))))``
    (``head = nn.Linear(H, 1)``; every layer with a bias) as one autograd node. Every parameter, the head
    bias included (an exact zero), gets a gradient through the result, as with ``input_gradient``; the
    derivative with respect to ``u`` is taken only when ``u`` requires grad."""
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    return _SiLUMLPInputGradient.apply(u, d, head.weight, head.bias, *params)[0]


def silu_mlp_vjp(u: torch.Tensor, d: int, linears: list[nn.Linear],
                 w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((d h_L / d u)^T w [:, :d], h_L)`` of the SiLU MLP ``h_L = silu(... silu(linears[0](u)))`` for a cotangent
    ``w [B, H]`` of ``h_L`` (every layer with a bias), as one autograd node differentiable in ``u``, ``w`` and the
    layers' parameters: the inner-product energy's input gradient of a ``TimeMLP`` in one node (``EnergyScore``)."""
    params = [p for lin in linears for p in (lin.weight, lin.bias)]
    return _SiLUMLPInputGradient.apply(u, d, w, None, *params)


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def time_mlp_layers(backbone: nn.Module, x: torch.Tensor, time_input: str,
                    out_dim: int | None) -> tuple[list[nn.Linear], nn.Linear] | None:
    """``(hidden linears, head)`` of a ``TimeMLP`` backbone whose input gradient the fused node can take
    (``silu_mlp_input_gradient``, ``silu_mlp_vjp``) for this call, else ``None``: a ``TimeMLP`` with output width
    ``out_dim`` read with time ``t``, in grad mode, float32/64 without autocast, on an ``x`` that does not require
    grad (a caller differentiating in ``x``, the likelihood's divergence, takes the general route), with the
    ``Linear``/``SiLU`` layout and no hooks (anything that could observe the difference takes the general route)."""
    from .nets import TimeMLP

    if (type(backbone) is not TimeMLP or backbone.out_dim != out_dim or time_input != "t" or x.dim() < 2
            or x.requires_grad or not torch.is_grad_enabled() or x.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled(x.device.type) or x[0].numel() != backbone.dim):
        return None
    mods = list(backbone.net)
    linears, acts = mods[0::2], mods[1::2]
    if (len(mods) % 2 != 1 or not all(type(m) is nn.Linear and m.bias is not None for m in linears)
            or not all(type(m) in (nn.SiLU, CompactSiLU) and not m.inplace for m in acts)
            or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in (backbone, backbone.net, backbone.time, *mods))
            or _global_module_hooks()):
        return None
    return linears[:-1], linears[-1]
