"""Step 1b of an ablation: the equal-wall-time arm (``budget.wall_time``), its steps from a pilot.

The comparison at equal steps favours the expensive objectives: the energy parametrisation's step costs
about 2.4 L2 steps on the digits UNet. At equal wall time every objective gets the seconds the reference
objective's ``N`` steps take: ``steps_o = round(N * c_ref / c_o)``, with ``c`` the seconds per optimizer step
(the training loop's own step: ``Trainer.seconds_per_step``, every phase, clipping and EMA included).

``measure_step_costs(ablation)`` times one run of every label (objective and grid point, the first seed) side
by side in this process: 3 warm-up steps each, then ``pilot_rounds`` rounds that time ``pilot_steps`` steps of
each label in turn (so a slow spell of the machine hits every label alike), the median round per label. It
writes ``<output_dir>/step_costs.json``, read by ``Ablation`` from then on (the steps are frozen: a resumed
ablation trains the same runs). The pilot runs with ``launcher.threads`` threads, as the runs do.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .config import Ablation, RunSpec, is_reference, write_json

__all__ = ["measure_step_costs", "equal_time_steps", "interleaved_seconds_per_step"]


def _reference_label(ab: Ablation, spec: RunSpec, labels: dict) -> str:
    """The reference's label at the grid point of ``spec``: the grid keys the reference fixes, objective
    hyperparameters and critic settings left out (the others, a backbone width say, must agree)."""
    ref = ab.schema.budget.wall_time
    fixed = {f.split("=", 1)[0] for f in ref.split("/")[1:]}

    def shared(s: RunSpec) -> dict:
        return {k: v for k, v in s.point.items()
                if not k.startswith(("objective.", "critic.")) and k.split(".")[-1] not in fixed}

    point = shared(spec)
    for label, other in labels.items():
        if is_reference(label, ref) and shared(other) == point:
            return label
    raise KeyError(f"no run of the reference {ref!r} at grid point {point}")


def equal_time_steps(steps: int, reference_seconds: float, seconds: float) -> int:
    """The steps of an objective at ``seconds`` per step in the time ``steps`` steps take at ``reference_seconds``."""
    return max(1, round(steps * reference_seconds / seconds))


def interleaved_seconds_per_step(configs: dict, steps: int, rounds: int, report=None) -> dict[str, list[float]]:
    """Seconds per optimizer step of each training config's ``Trainer`` (``{label: Config}``), timed side by side:
    3 warm-up steps each, then ``rounds`` rounds that time ``steps`` steps of each config in turn (the pilot;
    benchmarks/driver_step.py). ``{label: [seconds per step of each round]}``; ``report(round, times)`` after each
    round. Throw-away Trainers in a temporary directory (their weights move)."""
    from ..loop import Trainer
    from ..ranks import stop_guard

    times: dict[str, list[float]] = {label: [] for label in configs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {}
            for i, (label, cfg) in enumerate(configs.items()):
                trainers[label] = tr = Trainer(cfg, os.path.join(tmp, str(i)), None, progress=False)
                tr.seconds_per_step(3)                            # warm-up: first calls, allocator
            for r in range(rounds):
                for label, tr in trainers.items():
                    times[label].append(tr.seconds_per_step(steps, first=3 + r * steps))
                if report is not None:
                    report(r, times)
            for tr in trainers.values():
                tr.logbook.close()
    finally:
        stop_guard()
    return times


def measure_step_costs(ab: Ablation, progress: bool = True) -> dict:
    """Time every label's optimizer step side by side, write and return ``step_costs.json`` (see the module)."""
    b, lc = ab.schema.budget, ab.schema.launcher
    first_seed = ab.schema.seeds[0]
    labels = {r.label: r for r in ab.runs("steps") if r.seed == first_seed}
    threads = torch.get_num_threads()
    if lc.threads:
        torch.set_num_threads(lc.threads)
    t0 = time.perf_counter()

    def report(r, times):
        if progress:
            print(f"[ablate] pilot round {r + 1}/{b.pilot_rounds}: "
                  + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)

    try:
        times = interleaved_seconds_per_step({label: spec.config for label, spec in labels.items()}, b.pilot_steps,
                                             b.pilot_rounds, report)
    finally:
        torch.set_num_threads(threads)
    per_step = {label: statistics.median(v) for label, v in times.items()}
    n_ref = ab.runs("steps")[0].config.train.max_steps
    steps = {}
    for label, spec in labels.items():
        ref = _reference_label(ab, spec, labels)
        steps[label] = equal_time_steps(spec.config.train.max_steps, per_step[ref], per_step[label])
    costs = {"reference": b.wall_time, "reference_steps": n_ref, "seconds_per_step": per_step, "steps": steps,
             "rounds": times, "pilot_steps": b.pilot_steps, "pilot_rounds": b.pilot_rounds,
             "threads": lc.threads or threads, "pilot_seconds": time.perf_counter() - t0}
    write_json(ab.step_costs_path, costs)
    if progress:
        print(f"[ablate] equal wall time ({b.wall_time}'s {n_ref} steps): "
              + ", ".join(f"{k} {steps[k]} steps" for k in labels), flush=True)
    return costs
