"""The training driver's whole optimizer step for a few training configs, interleaved, as a ratio to an L2 config's.

What issue 16 item 3 asks of ``dual_sobolev`` alone: a step of at most 2x an L2 step. ``run.py``'s objective rows
time one joint step (forward + backward of the loss); a recipe with ``n_critic`` critic steps makes ``n_critic - 1``
critic-only steps besides, each with its own batch, clipping and optimizer step. This times what a user's run pays:
``gradscore_train.loop.Trainer``'s step for each config, side by side as the ablation runner's pilot does
(``gradscore_train.ablation.wall_time.interleaved_seconds_per_step``), one thread; ``ratio`` is the median over rounds
of the step time divided by the first config's step time of the same round (drift of a shared machine cancels).

    python benchmarks/driver_step.py        # the toy: L2, dual_sobolev (n_critic = 5), n_critic = 1's recipe
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

TOY_CONFIGS = ("configs/toy/l2.yaml", "configs/toy/dual_sobolev.yaml", "configs/toy/dual_sobolev_one_critic_step.yaml")
_QUIET = ["train.log_every=1000000", "eval.sample_every=0", "eval.diagnose_every=0", "train.checkpoint_every=0"]


def run(configs=TOY_CONFIGS, steps: int = 50, rounds: int = 7, log=print) -> list[dict]:
    """``[{config, n_critic, ms, ratio}]``: the driver's median seconds per optimizer step of each config and its
    ratio to the first config's (rounds of ``steps`` steps of each config in turn, after a warm-up)."""
    from gradscore_train.ablation.wall_time import interleaved_seconds_per_step
    from gradscore_train.build import check_objective_config
    from gradscore_train.config import load_config

    cfgs = {path: load_config(path, _QUIET) for path in configs}
    n_critic = {path: check_objective_config(c).validate(dict(c.objective.hparams)).get("n_critic", 0)
                for path, c in cfgs.items()}

    def report(r, times):
        log(f"[driver step] round {r + 1}/{rounds}: "
            + ", ".join(f"{os.path.basename(c)} {1e3 * v[-1]:.2f} ms" for c, v in times.items()))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = interleaved_seconds_per_step(cfgs, steps, rounds, report)
    finally:
        torch.set_num_threads(threads)
    first = times[configs[0]]
    return [dict(config=c, n_critic=n_critic[c], ms=1e3 * statistics.median(times[c]),
                 ratio=statistics.median(a / b for a, b in zip(times[c], first))) for c in configs]


def table(rows: list[dict]) -> str:
    lines = ["| config | n_critic | driver ms/step | step / first config's |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['n_critic'] or '-'} | {r['ms']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=list(TOY_CONFIGS), help="training configs; the first is the base")
    ap.add_argument("--steps", type=int, default=50, help="steps per config per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    print(table(run(tuple(args.configs), args.steps, args.rounds)))


if __name__ == "__main__":
    main()
