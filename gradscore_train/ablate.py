"""Controlled comparison of objectives and the correlation study: one command, one report.

    python -m gradscore_train.ablate configs/ablations/toy.yaml [--skip-study] [--runs-only] [--report-only]
    gradscore-ablate configs/ablations/toy.yaml              (the console script, same options)

The flow, one module of ``gradscore_train.ablation`` per step:

1. ``config``: read and validate the grid ``objectives x seeds x grid`` under one budget (equal steps);
   ``wall_time``: with ``budget.wall_time``, a pilot times every objective's step and adds the equal-wall-time arm;
2. ``runs``: train every run (resumable: finished runs are skipped, interrupted ones resume);
3. ``assessment``: assess every model with the same seeds: final checkpoints for the comparison, plus
   intermediate checkpoints and the perturbed exact scores of ``population`` for the study (cached);
4. ``study``: rank correlation between sample quality and each predictor, bootstrap intervals;
5. ``report``: write ``<output_dir>/report.md`` and its PNGs, and print the tables.

Internal: ``--run-one RUN_ID`` trains one run (what the subprocess / accelerate launchers call).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .ablation.assessment import assess_all
from .ablation.config import load_ablation
from .ablation.report import write_report
from .ablation.runs import train_all, train_one
from .config import ConfigError

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (2: a config error, 3: ``--run-one`` failed with NaN/Inf, 4: a run crashed,
    the report written without it)."""
    p = argparse.ArgumentParser(prog="python -m gradscore_train.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="ablation YAML, e.g. configs/ablations/toy.yaml")
    p.add_argument("--run-one", default=None, metavar="RUN_ID", help=argparse.SUPPRESS)
    p.add_argument("--runs-only", action="store_true", help="train the grid, no assessment or report")
    p.add_argument("--skip-study", action="store_true", help="no correlation study (study.enabled=false)")
    p.add_argument("--report-only", action="store_true", help="assess and report what has finished; train nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ab = load_ablation(args.config, {"study": {"enabled": False}} if args.skip_study else None)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.run_one is not None:
        if ab.schema.launcher.threads:      # the run's threads; the assessment below uses every core
            torch.set_num_threads(ab.schema.launcher.threads)
        status = train_one(ab.run(args.run_one))
        return 3 if status == "failed" else 0
    t0 = time.perf_counter()
    print(f"[ablate] {ab.schema.name}: {len(ab.runs())} runs ({len(ab.schema.objectives)} objectives x "
          f"{len(ab.schema.seeds)} seeds{' x grid' if ab.schema.grid else ''}) -> {ab.output_dir}", flush=True)
    status = {} if args.report_only else train_all(ab)
    # a run that stopped on NaN/Inf is a result of the comparison ("failed (non-finite loss ..."); a crash is not
    crashed = {k: v for k, v in status.items() if v.startswith("failed (exit")}
    if not args.runs_only:
        results = assess_all(ab)
        path, table = write_report(ab, results)
        print(table)
        print(f"[ablate] report: {path}  ({time.perf_counter() - t0:.1f}s)")
    if crashed:
        print(f"[ablate] {len(crashed)} run(s) crashed and are missing from the comparison (run the command again to "
              "retry them):\n" + "\n".join(f"  {k}: {v}" for k, v in crashed.items()), file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
