"""Deliberately perturbed exact scores: the controlled half of the correlation study's population.

With ``s = grad log p_t`` the exact score of a mixture (docs/theory.md §3, §8):

* rotation ``c``:  ``s + c J s`` (``gradscore.toy.add_zero_effect``): L2 error ``c^2 E|s|^2``, zero
  effect on the exact continuous-time sampler (its error is purely solenoidal);
* gradient ``a``:  ``s + a grad phi`` with ``phi(x) = x^T A x / 2``, ``A = diag(1, -1, 1, ...)``
  (``grad phi = A x``, a gradient field, so the error is all observable: it squeezes one axis and
  stretches the other);
* combination ``(a, c)``: both, ``s + a A x + c J s``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradscore.toy import add_zero_effect

__all__ = ["Perturbed", "perturbed_scores", "saddle_gradient"]


@dataclass
class Perturbed:
    name: str            # e.g. "rotation c=2"
    family: str          # "exact", "rotation", "gradient" or "combination"
    score_fn: Callable   # (x [B, d], t [B]) -> [B, d]
    a: float = 0.0
    c: float = 0.0


def saddle_gradient(x: torch.Tensor) -> torch.Tensor:
    """``grad phi(x) = A x`` with ``A = diag(1, -1, 1, -1, ...)``; ``x: [B, d]`` -> ``[B, d]``."""
    signs = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    signs[1::2] = -1.0
    return x * signs


def _with_gradient(score_fn, a: float):
    return lambda x, t: score_fn(x, t) + a * saddle_gradient(x)


def perturbed_scores(exact_score, rotations, gradient_errors, combinations) -> list[Perturbed]:
    """The exact score, then every rotation size, gradient size and ``[a, c]`` combination."""
    out = [Perturbed("exact", "exact", exact_score)]
    for c in rotations:
        out.append(Perturbed(f"rotation c={c:g}", "rotation", add_zero_effect(exact_score, float(c)), 0.0, float(c)))
    for a in gradient_errors:
        out.append(Perturbed(f"gradient a={a:g}", "gradient", _with_gradient(exact_score, float(a)), float(a), 0.0))
    for pair in combinations:
        if len(pair) != 2:
            raise ValueError(f"study.combinations entries must be [a, c] pairs, got {pair!r}")
        a, c = (float(v) for v in pair)
        out.append(Perturbed(f"gradient a={a:g} + rotation c={c:g}", "combination",
                             _with_gradient(add_zero_effect(exact_score, c), a), a, c))
    return out
