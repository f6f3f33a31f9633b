"""Attention on slices of the batch under a double backward (gradscore.double_backward.math_attention(chunk_bytes)).

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


def _attention_and_derivatives(q, k, v, mask, chunk_bytes):
    q, k, v = (a.detach().requires_grad_(True) for a in (q, k, v))
    with math_attention(chunk_bytes):
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
    """EnergyScore and Critic around a diffusers UNet with attention chunk by default (attention_chunk_bytes); a
    chunk of 2 samples gives the DSM loss and every parameter gradient of the whole-batch route (1e-6)."""
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
