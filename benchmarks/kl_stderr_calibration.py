"""Are the KL bounds' standard errors calibrated? Mean reported stderr against the spread over independent seeds
(data, noise, fits) of ``kl_bounds`` on the 2-D "pair" mixture with a model ``exact + grad phi + 2 J grad log p_t``
(the test suite's ``_mixture_model``), and the same per time for the gradient part, the solenoidal part and L2.
A ratio near 1 is calibrated; above 1 the stderr is conservative. Usage (features: about 2 minutes for 16 seeds
on one thread; neural: about 25 minutes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kl_stderr_calibration.py [--method features|neural] [--seeds 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="features", choices=["features", "neural"])
    p.add_argument("--seeds", type=int, default=16)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_diagnostics import _mixture_model

    from gradscore.diagnostics import kl_bounds
    from gradscore.sde import VPSDE
    from gradscore.toy import GaussianMixture

    sde, mix = VPSDE(), GaussianMixture.preset("pair")
    model = _mixture_model(mix, sde, 2.0)
    times = torch.tensor([sde.t_min, 0.05, 0.2, 0.5, 1.0])
    vals = {k: [] for k in ("gradient", "girsanov")}
    ses = {k: [] for k in vals}
    per_t = {k: [] for k in ("gradient_error", "solenoidal_error", "l2_error")}
    per_t_se = {k: [] for k in per_t}
    for seed in range(args.seeds):
        x0 = mix.sample(2048, generator=torch.Generator().manual_seed(100 + seed))
        kw = {"options": {"steps": 150, "seed": seed}} if args.method == "neural" else {}
        kl = kl_bounds(model, sde, x0, times, method=args.method, num_points=2**12,
                       generator=torch.Generator().manual_seed(seed), **kw)
        for k in vals:
            vals[k].append(kl[k].value)
            ses[k].append(kl[k].stderr)
        for k in per_t:
            per_t[k].append([e.value for e in kl[k]])
            per_t_se[k].append([e.stderr for e in kl[k]])
    ratio = {k: float(torch.tensor(ses[k]).mean() / torch.tensor(vals[k]).std()) for k in vals}
    pt = {k: [round(r, 3) for r in (torch.tensor(per_t_se[k]).mean(0) / torch.tensor(per_t[k]).std(0)).tolist()]
          for k in per_t}
    out = {"benchmark": "kl_stderr_calibration", "method": args.method, "seeds": args.seeds,
           "stderr_over_spread": ratio, "times": times.tolist(), "per_time_stderr_over_spread": pt}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
