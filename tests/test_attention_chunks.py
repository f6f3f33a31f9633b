"""Attention under a double backward (gradscore.double_backward.math_attention(chunk_bytes)): on slices of the batch,
and through twice_differentiable_attention (its second derivative written out, docs/theory.md section 10.1).

Oracle: slicing the batch does not change any sample's computation, so values, first and second derivatives equal
the whole-batch math kernel's to float32 rounding (1e-6 relative: the same kernels on smaller batches; measured
exact). What the chunking buys (a smaller peak of the energy step's backward) is measured in BENCHMARKS.md, not
asserted here (no timed or memory-sized tests)."""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gradscore import VPSDE, Critic, DSMLoss, EnergyScore
from gradscore.double_backward import ATTENTION_CHUNK_BYTES, attention_chunk_bytes, math_attention
from gradscore.nets import TimeMLP


class _BatchSizes(TorchFunctionMode):
    """Records the batch size of every scaled_dot_product_attention call that reaches it."""

    def __init__(self):
        super().__init__()
        self.sizes, self.shapes = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.sizes.append(args[0].shape[0])
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def _attention_and_derivatives(q, k, v, mask, chunk_bytes, written_derivative=False):
    q, k, v = (a.detach().requires_grad_(True) for a in (q, k, v))
    with math_attention(chunk_bytes, written_derivative):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (gq,) = torch.autograd.grad((out * torch.cos(out)).sum(), q, create_graph=True)
    second = torch.autograd.grad(gq.pow(2).sum(), (q, k, v))
    return out, gq, second


def test_chunked_attention_equals_the_whole_batch_to_second_order():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 5, 4, generator=g) for _ in range(3))
    per_sample = 2 * 5 * 5 * 4                                   # heads x L_q x L_k float32 scores
    for mask in (None, torch.randn(7, 2, 5, 5, generator=g), torch.randn(1, 1, 5, 5, generator=g)):
        whole = _attention_and_derivatives(q, k, v, mask, None)
        with _BatchSizes() as seen:
            chunked = _attention_and_derivatives(q, k, v, mask, 3 * per_sample)
        assert seen.sizes == [3, 3, 1]                          # 7 samples in chunks of 3
        for a, b in zip([whole[0], whole[1], *whole[2]], [chunked[0], chunked[1], *chunked[2]]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_energy_and_critic_on_a_unet_chunk_their_attention_exactly(attention_unet):
    """EnergyScore and Critic around a diffusers UNet with attention chunk by default (attention_chunk_bytes); with the
    math kernel's derivative (``attention_written_derivative = False``) a chunk of 2 samples gives the DSM loss and
    every parameter gradient of the whole-batch route (1e-6)."""
    sde = VPSDE()
    energy = EnergyScore(attention_unet(), sde)
    assert energy.attention_chunk_bytes == ATTENTION_CHUNK_BYTES
    assert Critic(attention_unet(), sde, potential="inner").attention_chunk_bytes == ATTENTION_CHUNK_BYTES
    assert attention_chunk_bytes(TimeMLP(2)) is None and EnergyScore(TimeMLP(2), sde).attention_chunk_bytes is None
    x0 = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(chunk_bytes):
        energy.attention_chunk_bytes = chunk_bytes
        energy.zero_grad(set_to_none=True)
        with _BatchSizes() as seen:
            loss = DSMLoss(sde)(energy, x0, generator=torch.Generator().manual_seed(2)).mean()
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in energy.parameters()], seen

    energy.attention_written_derivative = False          # slices of the math kernel (test_written_derivative_*)
    loss_w, grads_w, seen = loss_and_grads(None)
    sizes_w = seen.sizes
    (q, k), = set(seen.shapes)
    per_sample = q[1] * q[2] * k[2] * 4                 # heads x L_q x L_k float32 scores of one sample
    loss_c, grads_c, seen = loss_and_grads(2 * per_sample)
    sizes_c = seen.sizes
    assert set(sizes_w) == {6} and set(sizes_c) == {2} and len(sizes_c) == 3 * len(sizes_w)
    torch.testing.assert_close(loss_c, loss_w, rtol=1e-6, atol=0)
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads_c, grads_w))
    den = sum(float(b.pow(2).sum()) for b in grads_w)
    assert (num / den) ** 0.5 < 1e-6


def test_written_attention_derivative_is_the_math_kernels():
    """``twice_differentiable_attention`` (the default under ``math_attention(chunk_bytes)`` for calls without a mask):
    gradcheck and gradgradcheck in float64 (finite differences, default tolerances) check the written-out second
    derivative and, through the first-derivative node's own gradgradcheck, the third (the recomputed plain graph).
    Against the whole-batch math kernel its value, first and second derivatives agree to 1e-12 in float64 and 2e-6
    in float32 (rounding of the fused forward and of reassociated sums), whether the backward runs in one chunk or
    in slices of 3 samples, from 2 tokens to 256 (a 16x16 feature map) and for cross-attention (keys and values of
    another length and width); a masked call goes to the sliced math kernel.
    """
    from gradscore.double_backward import _Attention, _attention_plain, _AttentionInputGrads

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(3, 5, 4, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(4))
    attention = lambda q, k, v: _Attention.apply(q, k, v, 0.7, 2 * 5 * 5 * 8)  # noqa: E731  (chunks of 2)
    assert torch.autograd.gradcheck(attention, (q, k, v)) and torch.autograd.gradgradcheck(attention, (q, k, v))

    def input_grads(do, q, k, v):
        return _AttentionInputGrads.apply(do, q, k, v, _attention_plain(q, k, v, 0.7).detach(), 0.7, None)
    assert torch.autograd.gradcheck(input_grads, (do, q, k, v))
    assert torch.autograd.gradgradcheck(input_grads, (do, q, k, v))

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        for shape, kv in (((7, 2, 2, 4), (2, 4)), ((7, 2, 5, 4), (5, 4)), ((5, 4, 256, 8), (256, 8)),
                          ((6, 4, 16, 8), (7, 5))):          # the last: cross-attention (7 keys, values of width 5)
            q = torch.randn(*shape, dtype=dtype, generator=g)
            k = torch.randn(*shape[:2], kv[0], shape[3], dtype=dtype, generator=g)
            v = torch.randn(*shape[:2], *kv, dtype=dtype, generator=g)
            per_sample = shape[1] * shape[2] * kv[0] * q.element_size()
            whole = _attention_and_derivatives(q, k, v, None, None)
            for chunk in (64 * per_sample, 3 * per_sample):
                written = _attention_and_derivatives(q, k, v, None, chunk, written_derivative=True)
                for a, b in zip([whole[0], whole[1], *whole[2]], [written[0], written[1], *written[2]]):
                    assert torch.allclose(b, a, rtol=0, atol=tol * a.abs().max().item()), (dtype, shape, chunk)
    mask = torch.randn(7, 2, 5, 5, generator=g)
    with _BatchSizes() as seen:
        _attention_and_derivatives(*(torch.randn(7, 2, 5, 4, generator=g) for _ in range(3)), mask, 3 * 2 * 5 * 5 * 4,
                                   written_derivative=True)
    assert seen.sizes == [3, 3, 1]                          # a masked call: the math kernel on slices


def test_written_attention_derivative_in_energy_and_critic(attention_unet):
    """EnergyScore and Critic on a diffusers UNet with attention take the written derivative by default. The DSM loss
    and every parameter gradient equal the whole-batch math kernel's (``attention_chunk_bytes = None``) to 1e-10 in
    float64 (the fused forward and the written derivatives round differently), for a ``dual_sobolev`` step with a
    UNet critic too. Structural oracle at image size: the score ``-grad_x E`` differentiated once more through the
    written second derivative has a symmetric Jacobian (``<u, J v> = <v, J u>`` to 1e-10 relative, float64, 12 x 16
    x 16 = 3072 dimensions, attention over 64 tokens)."""
    import gradscore

    sde = VPSDE()
    x0 = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    energy = EnergyScore(attention_unet(), sde).double()
    critic = Critic(attention_unet(), sde, potential="inner").double()
    assert energy.attention_written_derivative and critic.attention_written_derivative

    def loss_and_grads(model, objective, chunk_bytes):
        for m in (model, critic):
            m.attention_chunk_bytes = chunk_bytes
            m.zero_grad(set_to_none=True)
        loss = objective(model, x0, generator=torch.Generator().manual_seed(2)).mean()
        loss.backward()
        params = [*model.parameters(), *(critic.parameters() if objective is not dsm else [])]
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    dsm = DSMLoss(sde)
    torch.manual_seed(3)
    score = gradscore.ScoreModel(attention_unet(), sde).double()
    for model, objective in ((energy, dsm), (score, gradscore.DualSobolevLoss(sde, critic, l2_weight=0.5))):
        loss_w, grads_w = loss_and_grads(model, objective, ATTENTION_CHUNK_BYTES)
        loss_m, grads_m = loss_and_grads(model, objective, None)
        assert torch.allclose(loss_w, loss_m, rtol=1e-12, atol=0)
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads_w, grads_m))
        den = sum(float(b.pow(2).sum()) for b in grads_m)
        assert den > 0 and (num / den) ** 0.5 < 1e-10, (type(model).__name__, (num / den) ** 0.5)

    big = EnergyScore(attention_unet(16, 12), sde).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 16, 16, dtype=torch.float64, generator=g).requires_grad_(True)
    u, v = (torch.randn(2, 12, 16, 16, dtype=torch.float64, generator=g) for _ in range(2))
    with _BatchSizes() as seen:
        s = big(x, torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert {shape[0][-2] for shape in seen.shapes} == {64} and len(seen.shapes) >= 3   # down, mid, up blocks at 8x8
    (ju,) = torch.autograd.grad(s, x, u, retain_graph=True)
    (jv,) = torch.autograd.grad(s, x, v)
    u_jv, v_ju = (u * jv).sum(), (v * ju).sum()
    assert abs(u_jv - v_ju) < 1e-10 * abs(u_jv), (u_jv, v_ju)


def test_written_attention_derivative_saves_nothing_of_the_scores_size(attention_unet):
    """What the written derivative is for (docs/theory.md section 10.1): an energy step on a UNet with attention over
    64 tokens saves no tensor shaped like the attention scores (``[..., 64, 64]``) for its backward, where the math
    kernel's route (``attention_written_derivative = False``, the negative control) saves some. A structural check
    of the memory claim; the bytes are measured in BENCHMARKS.md."""
    sde = VPSDE()
    energy = EnergyScore(attention_unet(16), sde)
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def saved_score_shaped(written):
        energy.attention_written_derivative = written
        shapes = []

        def pack(t):
            if t.dim() >= 3 and t.shape[-2:] == (64, 64):          # scores: [B(, heads), L, L]; not a weight
                shapes.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = DSMLoss(sde)(energy, x0, generator=torch.Generator().manual_seed(2)).mean()
        loss.backward()
        return shapes

    assert saved_score_shaped(True) == []
    assert saved_score_shaped(False)
