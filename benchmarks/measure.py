"""How a training step is measured: interleaved wall time, saved-for-backward bytes, peak tensor
memory and FLOPs. Everything here compares objectives *side by side in one process*.

* Time: ``interleaved_times`` runs the steps A B C A B C ... (the order rotated every round so no
  step always follows the same one), and ``paired_ratios`` divides each step's time by the L2
  step of the same round before taking the median: slow drift of a shared machine cancels.
* Saved-for-backward bytes (``saved_bytes``): every tensor autograd packs during forward (the
  inner ``autograd.grad(create_graph=True)`` of energies and critics included) is seen by a
  ``saved_tensors_hooks`` pack hook; bytes are summed over *distinct storages*, parameters excluded.
  On CPU this is the memory the step's graph holds between forward and backward (activations),
  independent of allocator caching and of the other processes on the machine.
* Peak memory (``peak_bytes``): resident memory high-water mark of the process during one step
  (forward, backward, optimizer step) above its level just before, read from ``/proc/self/status``
  after resetting the mark (``/proc/self/clear_refs``). ``pin_malloc`` first fixes glibc's mmap
  threshold at 64 KiB so every tensor larger than that is mapped and unmapped with its life: the
  high-water mark then follows live tensors, transient buffers of the backward included. (The
  torch profiler attributes allocations to operators, not to a time line; tracemalloc does not see
  torch's allocator at all.)
* FLOPs (``step_flops``): ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
  attention; elementwise work is not counted), so ``flops ratio`` is the work a perfect
  implementation would do and ``time ratio / flops ratio`` the overhead above it.
"""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["interleaved_times", "paired_ratios", "saved_bytes", "peak_bytes", "pin_malloc", "step_flops", "op_count",
           "median"]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleaved_times(steps: dict, rounds: int, warmup: int = 1) -> dict:
    """``{name: [seconds per round]}`` for ``steps = {name: callable()}``, run interleaved."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_ratios(times: dict, reference: str) -> dict:
    """Median over rounds of ``time[name][r] / time[reference][r]``."""
    ref = times[reference]
    return {n: median([a / b for a, b in zip(ts, ref)]) for n, ts in times.items()}


def saved_bytes(step_forward, exclude=()) -> int:
    """Bytes of distinct tensor storages saved for backward while ``step_forward()`` runs (it must
    build the graph and return the loss); storages of ``exclude`` (parameters) are not counted."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            ptr, nbytes = s.data_ptr(), s.nbytes()
        except (RuntimeError, NotImplementedError):      # tensor subclasses, sparse, meta...
            return t
        if ptr not in skip:
            seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_forward()
    del loss
    return sum(seen.values())


def pin_malloc() -> bool:
    """Make glibc return freed tensors to the OS (mmap threshold fixed at 64 KiB, no dynamic
    growth), so resident memory follows live tensor memory. Returns whether it applied."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(step, repeats: int = 2):
    """Peak resident memory above the pre-step level during ``step()`` (Linux: the high-water mark
    is reset through ``/proc/self/clear_refs``); minimum over ``repeats`` warm steps. ``None`` where
    the kernel does not allow the reset."""
    step()                                              # one-time buffers (MKL/oneDNN, Adam state)
    best = None
    for _ in range(repeats):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss0 = _status("VmRSS")
        except OSError:
            return None
        step()
        peak = _status("VmHWM") - rss0
        best = peak if best is None else min(best, peak)
    return best


class _FlopCounter:
    """A dispatch mode adding up ``torch.utils.flop_counter``'s formulas (matmul, convolution and
    their backward, attention). ``FlopCounterMode`` itself cannot be used: its module tracker
    breaks ``autograd.grad`` inside forward ("_will_engine_execute_node")."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.flops = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in flop_registry:
                    self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
                return out

        return Mode()


def step_flops(step) -> int:
    """Matmul/convolution/attention FLOPs of ``step()`` (forward, backward, double backward)."""
    with _FlopCounter() as counter:
        step()
    return counter.flops


def op_count(step) -> int:
    """ATen operator calls dispatched during ``step()`` (forward, inner ``autograd.grad``, backward,
    optimizer step; views included): what a step costs in per-operator dispatch when every kernel
    is tiny."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Mode.calls += 1
            return func(*args, **(kwargs or {}))

    with Mode():
        step()
    return Mode.calls
