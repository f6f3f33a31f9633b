"""Wall time of bits/dim (probability-flow ODE likelihood) of digits under a digits-sized UNet2DModel.

The score model is ``configs/digits/l2.yaml``'s (``ScoreModel(UNet2DModel, VPSDE, output="eps")``, built by the
driver's ``build_score_model``), with random weights or, with ``--checkpoint``, a trained run's (EMA) weights. The
cost of one evaluation does not depend on the weights, but the number of solver steps does: an untrained network's
velocity field is far stiffer at large ``t`` than a trained one's (whose ``eps_hat ~ x_t`` there). Data: the first
``--n`` scikit-learn digits (8x8, 17 levels scaled to [-1, 1]); ``bits_per_dim`` with Hutchinson (one Rademacher probe)
and scipy's RK45 at rtol = atol = 1e-5. Prints one JSON line. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/likelihood_cost.py [--n 512] [--chunk 512] [--checkpoint RUN_DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="number of digits")
    p.add_argument("--chunk", type=int, default=None, help="samples per adaptive solve (default: all)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--config", default="configs/digits/l2.yaml")
    p.add_argument("--checkpoint", default=None,
                   help="a run folder or checkpoint of --config (default: random weights)")
    args = p.parse_args(argv)

    from gradscore import OBJECTIVES
    from gradscore.diagnostics import bits_per_dim
    from gradscore_train.build import build_score_model, build_sde
    from gradscore_train.config import load_config
    from gradscore_train.data import build_source

    cfg = load_config(args.config)
    torch.manual_seed(0)
    sde = build_sde(cfg)
    source = build_source(cfg.data)
    if args.checkpoint:
        from gradscore_train.build import load_trained
        _, model, _ = load_trained(cfg, args.checkpoint)
    else:
        model = build_score_model(cfg, sde, source.shape, OBJECTIVES[cfg.objective.name]).eval()
    x = source.images[: args.n]
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    bpd, stats = bits_per_dim(model, sde, x, levels=17, generator=g, rtol=args.rtol, atol=args.rtol,
                              n_probes=args.n_probes, chunk=args.chunk, return_stats=True)
    wall = time.perf_counter() - t
    out = {"benchmark": "likelihood_cost", "n": int(x.shape[0]), "dims": int(x[0].numel()),
           "model": f"UNet2DModel {list(cfg.model.block_out_channels)} "
                    f"({'trained: ' + args.checkpoint if args.checkpoint else 'random weights'})",
           "method": "hutchinson", "n_probes": args.n_probes, "rtol": args.rtol, "chunk": args.chunk,
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "nfe": stats["nfe"], "wall_s": round(wall, 2), "s_per_nfe": round(wall / stats["nfe"], 4),
           "bpd_mean": round(float(bpd.mean()), 4)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
