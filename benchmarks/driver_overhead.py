"""Overhead of the training driver (``gradscore_train.loop.run``) against bare PyTorch loops with the same
score model, objective, batch size and optimizer.

The driver's per-step time is the wall time of ``gradscore_train.loop.Trainer(config, ...).train()`` (the
loop ``gradscore_train.loop.run`` runs: accelerate, per-micro-batch reseeding and batch drawing, clipping,
the non-finite guard, warm-up, EMA, logging) divided by its steps, with the Trainer built before
the clock starts and its end-of-run evaluation and checkpoint writing replaced by no-ops (they are
not per-step costs). Two bare loops, written as a researcher would by hand:

* ``recipe``: the same training recipe as the driver, plainly: draw a fresh batch from the data
  source, ``zero_grad; loss.backward()``, ``clip_grad_norm_`` (when the config clips), the same
  AdamW (``gradscore_train.loop.make_optimizer``), an EMA of the weights (``torch._foreach_lerp_``). The
  driver's overhead is measured against this loop: the same arithmetic, without the machinery.
* ``minimal``: ``zero_grad; loss.backward(); opt.step()`` on batches drawn beforehand: no EMA, no
  clipping, no data drawing (reported for reference: it does less work than the driver).

Driver and the bare loops alternate (driver, recipe, minimal, driver, ...) and medians are taken.
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


def _bare_loop_seconds(cfg, steps: int, recipe: bool) -> float:
    from gradscore_train.build import (
        build_critic,
        build_score_model,
        build_sde,
        check_objective_config,
        objective_from_config,
    )
    from gradscore_train.data import build_source
    from gradscore_train.loop import make_optimizer

    spec = check_objective_config(cfg)
    source = build_source(cfg.data)
    sde = build_sde(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_score_model(cfg, sde, source.shape, spec)
    critic = build_critic(cfg, sde, source.shape) if getattr(spec, "needs_critic", False) else None
    objective = objective_from_config(cfg, sde, critic)
    params = [*model.parameters(), *(objective.critic.parameters() if objective.critic is not None else [])]
    groups = [{"params": params, "lr": cfg.train.lr}]
    if recipe:
        opt = make_optimizer(groups, cfg.train.lr, cfg.train.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    weights = list(model.parameters())
    ema = [p.detach().clone() for p in weights]
    g = torch.Generator().manual_seed(0)
    batches = [source.sample_x0(cfg.train.batch_size, generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(steps):
        x0 = source.sample_x0(cfg.train.batch_size, generator=g) if recipe else batches[i % 4]
        opt.zero_grad(set_to_none=True)
        objective(model, x0).mean().backward()
        if recipe and cfg.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        opt.step()
        if recipe:
            with torch.no_grad():
                torch._foreach_lerp_(ema, weights, 1 - cfg.train.ema_decay)
    return time.perf_counter() - t0


def _driver_seconds(cfg, steps: int) -> float:
    """Wall time of ``Trainer.train()`` for ``steps`` steps, construction excluded; the evaluation
    and checkpoint writing it does at the end are replaced by no-ops for the measurement."""
    import copy

    from gradscore_train import loop

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
    """``{config, driver_ms, recipe_ms, minimal_ms, overhead, overhead_minimal}`` (per-step
    milliseconds; overhead = median over repeats of driver/recipe - 1, overhead_minimal likewise
    against the minimal loop), or ``None`` when ``gradscore_train.loop`` does not exist yet."""
    try:
        import gradscore_train.loop  # noqa: F401
        from gradscore_train.config import load_config
    except ImportError:
        return None
    import logging

    logging.getLogger("train").setLevel(logging.WARNING)
    cfg = load_config(config_path, _OVERRIDES)
    _bare_loop_seconds(cfg, 5, True)                     # warm-up (allocator, oneDNN)
    drv, rec, mini = [], [], []
    for _ in range(repeats):
        drv.append(_driver_seconds(cfg, steps) / steps)
        rec.append(_bare_loop_seconds(cfg, steps, True) / steps)
        mini.append(_bare_loop_seconds(cfg, steps, False) / steps)
    med = statistics.median
    return dict(config=config_path, batch=cfg.train.batch_size, driver_ms=1e3 * med(drv), recipe_ms=1e3 * med(rec),
                minimal_ms=1e3 * med(mini), overhead=med(x / y for x, y in zip(drv, rec)) - 1,
                overhead_minimal=med(x / y for x, y in zip(drv, mini)) - 1, steps=steps, repeats=repeats)
