"""Which tensors are live at a training step's memory peak, by the operator that made them and the phase.

    python benchmarks/peak_attribution.py --case unet32 --objective energy [--whole-attention]

A ``TorchDispatchMode`` sees every ATen call of one warm step (forward, backward, optimizer step) and tracks the
storages of the outputs (parameters excluded) until they die (``StorageWeakRef``); at the largest total it keeps
the live bytes grouped by phase, operator and, for tensors made in the backward, shape. The total agrees with
``measure.peak_bytes`` (resident memory) to a few percent: BENCHMARKS.md, "What limits the energy route".
``--whole-attention`` turns off ``EnergyScore``'s batch-sliced attention (``attention_chunk_bytes = None``).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensors", "attribute_peak"]


class LiveTensors(TorchDispatchMode):
    """Live output storages of the ATen calls in the context; ``peak`` bytes and ``at_peak`` (a Counter of bytes by
    ``(phase, operator[shape])``). Set ``phase`` from outside to label what follows."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.current = self.peak = self.calls = 0
        self.at_peak: collections.Counter = collections.Counter()
        self.peak_call = ""
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                st = t.untyped_storage()
                if st._cdata in self.live or st.nbytes() == 0:
                    continue
                name = func.__name__ + (str(tuple(t.shape)) if self.phase == "backward" else "")
                self.live[st._cdata] = (StorageWeakRef(st), st.nbytes(), self.phase, name)
                self.current += st.nbytes()
        if self.current > self.peak:
            self.peak, self.peak_call = self.current, f"#{self.calls} {func.__name__} ({self.phase})"
            self.at_peak = collections.Counter()
            for _, nbytes, phase, name in self.live.values():
                self.at_peak[(phase, name)] += nbytes
        return out


def attribute_peak(step) -> LiveTensors:
    """Run one warm step of ``benchmarks.setups.Step`` under ``LiveTensors``."""
    step()
    mode = LiveTensors()
    step.opt.zero_grad(set_to_none=True)
    with mode:
        loss = step.forward()
        mode.phase = "backward"
        loss.backward()
        mode.phase = "optimizer"
        step.opt.step()
    return mode


def main(argv=None):
    from benchmarks.run import CASES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="unet32", choices=list(CASES))
    ap.add_argument("--objective", default="energy")
    ap.add_argument("--whole-attention", action="store_true", help="EnergyScore/Critic attention_chunk_bytes = None")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, info = CASES[args.case]["build"](names=["l2", args.objective])
    for name in ("l2", args.objective):
        s = steps[name]
        for m in (s.model, s.critic):
            if args.whole_attention and hasattr(m, "attention_chunk_bytes"):
                m.attention_chunk_bytes = None
        mode = attribute_peak(s)
        made = collections.Counter()
        for (phase, _), b in mode.at_peak.items():
            made[phase] += b
        print(f"{args.case} {name}: peak {mode.peak / 2**20:.1f} MB at {mode.peak_call}; live at the peak, by the "
              "phase that made it: " + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in made.items()))
        for (phase, op), b in mode.at_peak.most_common(args.top):
            print(f"  {phase:9s} {op:55s} {b / 2**20:8.1f} MB")


if __name__ == "__main__":
    main()
