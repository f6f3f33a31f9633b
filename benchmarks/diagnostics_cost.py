"""Wall time of the gradient and solenoidal parts (``gradscore.diagnostics.decompose``, default method) of a
digits-sized UNet at one time.

The score model is ``configs/digits/l2.yaml``'s (``ScoreModel(UNet2DModel, ...)`` built by the driver's
``build_score_model``) with random weights, or a trained run's with ``--checkpoint``; with ``--energy`` the same
backbone as an ``EnergyScore`` (``configs/digits/energy.yaml``: its solenoidal part must read ~0). Data: the
scikit-learn digits (8x8, scaled to [-1, 1]). Prints one JSON line. Usage:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/diagnostics_cost.py [--t 0.3] [--num-data 1024] [--energy]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--num-data", type=int, default=1024)
    p.add_argument("--energy", action="store_true", help="configs/digits/energy.yaml (EnergyScore)")
    p.add_argument("--checkpoint", default=None, help="a run folder of the config (default: random weights)")
    args = p.parse_args(argv)

    from gradscore import OBJECTIVES
    from gradscore.diagnostics import decompose
    from gradscore_train.build import build_score_model, build_sde, load_trained
    from gradscore_train.config import load_config
    from gradscore_train.data import build_source

    cfg = load_config("configs/digits/energy.yaml" if args.energy else "configs/digits/l2.yaml")
    torch.manual_seed(0)
    sde = build_sde(cfg)
    source = build_source(cfg.data)
    if args.checkpoint:
        _, model, _ = load_trained(cfg, args.checkpoint)
    else:
        model = build_score_model(cfg, sde, source.shape, OBJECTIVES[cfg.objective.name]).eval()
    x0 = source.images[: args.num_data]
    t0 = time.perf_counter()
    out = decompose(model, sde, x0, args.t, generator=torch.Generator().manual_seed(0))
    wall = time.perf_counter() - t0
    res = {"benchmark": "diagnostics_cost", "config": cfg.objective.name, "t": args.t, "num_data": int(x0.shape[0]),
           "dims": int(x0[0].numel()), "threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "wall_s": round(wall, 1),
           **{k: [round(out[k].value, 4), round(out[k].stderr, 4)] for k in ("gradient", "solenoidal", "l2")},
           "path_beta": out["gradient"].extra["path_beta"]}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
