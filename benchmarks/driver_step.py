"""The training driver's whole optimizer step for a few training configs, interleaved, as a ratio to an L2 config's.

What issue 16 item 3 asks of ``dual_sobolev`` alone: a step of at most 2x an L2 step. ``run.py``'s objective rows
time one joint step (forward + backward of the loss); a recipe with ``n_critic`` critic steps makes ``n_critic - 1``
critic-only steps besides, each with its own batch, clipping and optimizer step. This times what a user's run pays:
``gradscore_train.loop.Trainer``'s step (``seconds_per_step``, the ablation runner's pilot) for each config, the
configs in turn, ``rounds`` times, one thread; ``ratio`` is the median over rounds of the step time divided by the
first config's step time of the same round (drift of a shared machine cancels).

    python benchmarks/driver_step.py        # the toy: L2, dual_sobolev (n_critic = 5), n_critic = 1's recipe
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

TOY_CONFIGS = ("configs/toy/l2.yaml", "configs/toy/dual_sobolev.yaml", "configs/toy/dual_sobolev_one_critic_step.yaml")
_QUIET = ["train.log_every=1000000", "eval.sample_every=0", "eval.diagnose_every=0", "train.checkpoint_every=0"]


def run(configs=TOY_CONFIGS, steps: int = 50, rounds: int = 7, log=print) -> list[dict]:
    """``[{config, n_critic, ms, ratio}]``: the driver's median seconds per optimizer step of each config and its
    ratio to the first config's (interleaved rounds of ``steps`` steps after a warm-up)."""
    from gradscore_train.config import load_config
    from gradscore_train.loop import Trainer
    from gradscore_train.ranks import stop_guard

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {c: [] for c in configs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {}
            for i, path in enumerate(configs):
                cfg = load_config(path, _QUIET)
                trainers[path] = tr = Trainer(cfg, os.path.join(tmp, str(i)), None, progress=False)
                tr.seconds_per_step(3)                          # warm-up: first calls, allocator
            for r in range(rounds):
                order = list(configs[r % len(configs):]) + list(configs[:r % len(configs)])
                for path in order:
                    times[path].append(trainers[path].seconds_per_step(steps, first=3 + r * steps))
                log(f"[driver step] round {r + 1}/{rounds}: "
                    + ", ".join(f"{os.path.basename(c)} {1e3 * v[-1]:.2f} ms" for c, v in times.items()))
            n_critic = {c: trainers[c].objective.n_critic for c in configs}
            for tr in trainers.values():
                tr.logbook.close()
    finally:
        stop_guard()
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
