"""Cost of ``gradscore.diagnostics.gradient_error`` against a sample-based quality metric (energy
distance of sampled points to data) at equal ranking ability.

Five scores of the ring8 mixture under VP, ``s_c = grad log p_t + c u`` (``u`` a fixed unit vector,
a gradient error: ``||Pi_G e_t||^2 = c^2`` exactly), ``c`` in ``SIZES``. Each metric ranks them at a
ladder of budgets (points of ``p_t`` for ``gradient_error`` at ``TIMES``, one noise per data point; sampled points for
the energy distance, reverse SDE with ``STEPS`` steps); a budget *ranks* when every seed gives the
exact order of ``c``. Reported: the smallest budget that ranks and the wall time of one ranking there.
"""
from __future__ import annotations

import time

import torch

import gradscore

SIZES = (0.0, 0.05, 0.1, 0.15, 0.2)
TIMES = (0.2,)      # the error c u is the same at every t: one time suffices to rank
STEPS = 100


def _scores(sde):
    mix = gradscore.toy.GaussianMixture.preset("ring8")
    true = mix.score_fn(sde)
    u = torch.tensor([0.6, 0.8])
    fns = [(lambda x, t, c=c: true(x, t) + c * u.to(x.dtype)) for c in SIZES]
    return mix, fns


def _ranks(values) -> bool:
    return all(a < b for a, b in zip(values[:-1], values[1:]))


def _gradient_error_metric(fn, sde, x0, n, seed):
    g = torch.Generator().manual_seed(seed)
    ests = gradscore.diagnostics.gradient_error(fn, sde, x0[:n], list(TIMES), num_points=n, generator=g)
    return sum(float(e) for e in ests) / len(ests)


def _energy_distance_metric(fn, sde, data, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = gradscore.sample(fn, sde, (n, 2), method="sde", steps=STEPS, generator=g)
    return gradscore.energy_distance(x, data[:n])


def run(seeds=(0, 1, 2)):
    """Returns a list of rows ``{metric, budget, ranks (seeds ranking right / seeds), seconds per ranking}``."""
    if not hasattr(gradscore, "diagnostics"):
        import importlib

        try:
            importlib.import_module("gradscore.diagnostics")
        except ImportError:
            return None
    sde = gradscore.VPSDE()
    mix, fns = _scores(sde)
    x0 = mix.sample(16384, generator=torch.Generator().manual_seed(100))
    data = mix.sample(8000, generator=torch.Generator().manual_seed(101))
    ladders = {
        "gradient_error (points of p_t at t=0.2)": (_gradient_error_metric, x0, (1024, 4096, 16384)),
        f"energy distance (sampled points, {STEPS}-step SDE)": (_energy_distance_metric, data,
                                                                (500, 1000, 2000, 4000, 8000)),
    }
    rows = []
    for metric, (fn_metric, ref, budgets) in ladders.items():
        for n in budgets:
            ok, secs = 0, []
            for seed in seeds:
                t0 = time.perf_counter()
                vals = [fn_metric(f, sde, ref, n, seed) for f in fns]
                secs.append(time.perf_counter() - t0)
                ok += _ranks(vals)
            rows.append(dict(metric=metric, budget=n, ranks=f"{ok}/{len(seeds)}", seconds=sorted(secs)[len(secs) // 2],
                             all_rank=ok == len(seeds)))
            if ok == len(seeds):
                break
    return rows
