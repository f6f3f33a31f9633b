"""Overhead of the training driver (``train.loop.run``) against a bare PyTorch loop with the same
score model, objective, batch size and optimizer.

The driver's per-step time is the wall time of ``train.loop.Trainer(config, ...).train()`` (the
loop ``train.loop.run`` runs: accelerate, per-micro-batch reseeding and batch drawing, clipping,
the non-finite guard, warm-up, EMA, logging) divided by its steps, with the Trainer built before
the clock starts and its end-of-run evaluation and checkpoint writing replaced by no-ops (they are
not per-step costs). The bare loop is ``zero_grad; objective(model, x0).mean().backward();
AdamW.step()`` on batches drawn beforehand, same model, objective, batch and optimizer. The two
alternate (driver, bare, driver, bare ...) and medians are taken.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

_OVERRIDES = ["train.checkpoint_every=0", "eval.sample_every=0", "eval.diagnose_every=0", "eval.num_samples=100",
              "eval.sample_steps=10", "eval.quality=false", "eval.diag_times=[0.5]", "eval.diag_samples=64",
              "train.log_every=1000000", "train.warmup_steps=0"]


def _bare_loop_seconds(cfg, steps: int) -> float:
    from train.build import build_critic, build_objective, build_score_model, build_sde, check_objective_config
    from train.data import build_source

    spec = check_objective_config(cfg)
    source = build_source(cfg.data)
    sde = build_sde(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_score_model(cfg, sde, source.shape, spec)
    critic = build_critic(cfg, sde, source.shape) if getattr(spec, "needs_critic", False) else None
    objective = build_objective(cfg, sde, critic)
    params = [*model.parameters(), *(objective.critic.parameters() if objective.critic is not None else [])]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    g = torch.Generator().manual_seed(0)
    batches = [source.sample_x0(cfg.train.batch_size, generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        objective(model, batches[i % 4]).mean().backward()
        opt.step()
    return time.perf_counter() - t0


def _driver_seconds(cfg, steps: int) -> float:
    """Wall time of ``Trainer.train()`` for ``steps`` steps, construction excluded; the evaluation
    and checkpoint writing it does at the end are replaced by no-ops for the measurement."""
    import copy

    from train import loop

    cfg = copy.deepcopy(cfg)
    cfg.train.max_steps = steps
    saved = loop.Trainer.evaluate, loop.save_checkpoint
    loop.Trainer.evaluate = lambda self, *a, **k: {}
    loop.save_checkpoint = lambda *a, **k: None
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = loop.Trainer(cfg, os.path.join(out, "run"), None, False)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
            trainer.logbook.close()
    finally:
        loop.Trainer.evaluate, loop.save_checkpoint = saved
    return seconds


def run(config_path="configs/toy/l2.yaml", steps=100, repeats=3):
    """``{config, driver_ms, bare_ms, overhead}`` (per-step milliseconds, overhead = driver/bare - 1),
    or ``None`` when ``train.loop`` does not exist yet."""
    try:
        from train.config import load_config
        import train.loop  # noqa: F401
    except ImportError:
        return None
    import logging

    logging.getLogger("train").setLevel(logging.WARNING)
    cfg = load_config(config_path, _OVERRIDES)
    _bare_loop_seconds(cfg, 5)                          # warm-up (allocator, oneDNN)
    drv, bare = [], []
    for _ in range(repeats):
        drv.append(_driver_seconds(cfg, steps) / steps)
        bare.append(_bare_loop_seconds(cfg, steps) / steps)
    d, b = statistics.median(drv), statistics.median(bare)
    ratio = statistics.median(x / y for x, y in zip(drv, bare))
    return dict(config=config_path, batch=cfg.train.batch_size, driver_ms=1e3 * d, bare_ms=1e3 * b, overhead=ratio - 1,
                steps=steps, repeats=repeats)
