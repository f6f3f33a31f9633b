"""The attention's double backward alone: the written derivative against the math kernel's, interleaved.

    python benchmarks/attention_double_backward.py [--shape 32 8 256 8] [--rounds 30]

One step: attention forward, ``autograd.grad`` of a linear function of the output with ``create_graph``, then the
backward of a linear function of those gradients (what an energy step asks of each attention layer), under
``math_attention(ATTENTION_CHUNK_BYTES, written_derivative)``. Prints the median ms of each route and the median over
rounds of written / math (BENCHMARKS.md, "Fast paths tried")."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.measure import interleaved_times, median, paired_ratios
from gradscore.double_backward import ATTENTION_CHUNK_BYTES, math_attention


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 8, 256, 8], metavar=("B", "HEADS", "L", "D"))
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*args.shape, generator=g).requires_grad_(True) for _ in range(3))
    w = torch.randn(*args.shape, generator=g)

    def step(written: bool):
        def run():
            with math_attention(ATTENTION_CHUNK_BYTES, written):
                out = F.scaled_dot_product_attention(q, k, v)
            gq, gk, gv = torch.autograd.grad((out * w).sum(), (q, k, v), create_graph=True)
            ((gq * w).sum() + (gk * w).sum() + (gv * w).sum()).backward()
        return run

    times = interleaved_times({"math": step(False), "written": step(True)}, rounds=args.rounds)
    result = {"shape": args.shape, "rounds": args.rounds, "math_ms": 1e3 * median(times["math"]),
              "written_ms": 1e3 * median(times["written"]), "written/math": paired_ratios(times, "math")["written"]}
    print(result)
    return result


if __name__ == "__main__":
    main()
