"""The training loop: one loop for every objective, on accelerate.

``run(config, output_dir, resume=None, max_steps=None, progress=True) -> dict`` trains and returns
the final metrics (also written to ``<output_dir>/final_metrics.json``). It is what
``python -m gradscore_train.train`` calls and what the ablation runner calls.

Reproducibility: every micro-batch reseeds the random state from ``(seed, step, phase, j)`` with
``j = micro * num_processes + rank`` its index within the global batch, and draws its examples
from ``BatchPlan``. So a resumed run repeats the uninterrupted one exactly (model, optimizer and
EMA come from the checkpoint; everything random is a function of the step), and splitting one
global batch over processes or accumulation micro-batches draws the same examples and noise.

Per optimizer step: the objective's recipe ``objective.phases()`` (``gradscore.objectives.Phase``), in
its order: ``n_critic - 1`` critic-only phases (``trains_model=False``: ``objective.critic_loss`` on the
unwrapped score model, so its gradients stay local and are dropped), then the joint phase on score model
and critic together; each phase is one optimizer step with gradient clipping (the score model's and the
critic's norms separately) and a non-finite guard (before the update, agreed across ranks); then the
learning-rate warm-up and the EMA of the score model.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time

import torch
import yaml

from gradscore.objectives import Phase

from . import evaluation
from .budget import EvalBudget, fit_points, fit_samples
from .build import (
    build_critic,
    build_score_model,
    build_sde,
    check_labels,
    check_objective_config,
    objective_from_config,
    unconditional,
)
from .checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    latest_intact_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError, check_resume_config, config_to_dict, read_yaml
from .data import BatchPlan, build_source, micro_seed
from .ema import EMA
from .logbook import Logbook
from .ranks import check_world_size, report_failure, set_step, start_guard, stop_guard

__all__ = ["run", "Trainer", "NonFiniteLoss", "check_writable", "resolve_mixed_precision", "make_optimizer"]

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/Inf; the last checkpoint on disk is intact."""


def resolve_mixed_precision(mode: str) -> str:
    if mode == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return mode


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator

    # cpu=True without CUDA: under `accelerate launch --multi_gpu` on CPU this is what makes the
    # processes join one gloo group instead of each believing it is rank 0 of 1
    # (docs/engineering.md, "accelerate on CPU").
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                      gradient_accumulation_steps=cfg.train.grad_accum)
    check_world_size(acc.num_processes)
    return acc


def make_optimizer(groups, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (a group's own ``weight_decay`` overrides ``weight_decay``); the fused
    kernel where torch has one for these parameters (CPU and CUDA floating point: one kernel for all
    tensors instead of a Python loop; BENCHMARKS.md, section "Training driver overhead"), else the default
    implementation."""
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _lr_scale(step: int, warmup: int) -> float:
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global generator the objectives draw ``t`` and noise from (``generator=None``).

    On CPU only the CPU generator is seeded: ``torch.manual_seed`` also queues a lazy CUDA seeding
    (with a captured stack trace) on every call, a large part of a toy step
    (BENCHMARKS.md, section "Training driver overhead")."""
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class Trainer:
    """One training run; ``Trainer(config, output_dir, resume, progress).train() -> metrics``.
    Attributes after construction: ``acc`` (the Accelerator), ``model`` and ``critic`` (prepared),
    ``objective``, ``phases`` (its recipe, on the prepared critic), ``ema``, ``source``, ``sde``,
    ``start_step``."""
    def __init__(self, cfg: Config, output_dir: str, resume, progress: bool, allow_config_change: bool = False,
                 allow_max_steps: bool = False):
        self.cfg, self.output_dir, self.progress = cfg, output_dir, progress
        self.spec = check_objective_config(cfg)
        self.acc = acc = _make_accelerator(cfg)
        self.main = acc.is_main_process
        start_guard(acc.num_processes, acc.process_index)      # a failing rank stops the others (ranks.py)
        check_writable(output_dir, acc.process_index)
        self.source = build_source(cfg.data)
        check_labels(cfg, self.source)
        self.plan = BatchPlan(self.source, cfg.train.batch_size, acc.num_processes * cfg.train.grad_accum,
                              cfg.train.seed)
        self.sde = build_sde(cfg)
        torch.manual_seed(cfg.train.seed)                       # identical initial weights on every rank
        model = build_score_model(cfg, self.sde, self.source.shape, self.spec)
        critic = build_critic(cfg, self.sde, self.source.shape) if self.spec.needs_critic else None
        self.objective = objective_from_config(cfg, self.sde, critic)
        critic = self.objective.critic
        # the two players of the min-max are optimised side by side, not jointly: one parameter group
        # each, with its own learning rate and weight decay, and its own gradient clipping (clip_gradients)
        groups = [{"params": list(model.parameters()), "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}]
        if critic is not None:
            groups.append({"params": list(critic.parameters()), "lr": cfg.critic.lr or cfg.train.lr,
                           "weight_decay": cfg.critic.weight_decay}
                          | ({"betas": tuple(cfg.critic.betas)} if cfg.critic.betas is not None else {}))
        self.base_lrs = [g["lr"] for g in groups]
        opt = make_optimizer(groups, cfg.train.lr)
        if critic is not None:
            self.model, self.critic, self.opt = acc.prepare(model, critic, opt)
            self.objective.critic = self.critic                   # the objective must use the prepared module
        else:
            self.model, self.opt = acc.prepare(model, opt)
            self.critic = None
        self.phases = self.objective.phases()
        self._check_outputs(acc.unwrap_model(self.model), acc.unwrap_model(self.critic) if critic is not None else None)
        from accelerate.utils import DistributedType

        # one process or plain DDP, no loss scaler: accelerate's backward, clipping and optimizer
        # wrappers only forward to torch there (see _clip, _optimizer_step)
        self._plain = acc.scaler is None and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                                       DistributedType.MULTI_GPU)
        critic_clip = cfg.train.clip_grad if cfg.critic.clip_grad is None else cfg.critic.clip_grad
        self.max_grad_norms = (cfg.train.clip_grad or math.inf, critic_clip or math.inf)   # (score model, critic)
        self._score_params = list(self.model.parameters())
        self._critic_params = list(self.critic.parameters()) if self.critic is not None else []
        self._zero_norm = torch.zeros((), device=acc.device)       # the norm of no gradients
        self._data_gen = torch.Generator()                      # reseeded for every micro-batch
        self.ema = EMA(acc.unwrap_model(self.model), cfg.train.ema_decay)
        self.logbook = Logbook(output_dir, enabled=self.main)
        self.start_step = 0
        self.last_checkpoint = None
        if resume:
            ckpt = self._resume_from(resume, allow_config_change, allow_max_steps)
            self.start_step = load_checkpoint(acc, ckpt, [self.model] + ([self.critic] if self.critic else []),
                                              self.opt, self.ema)
            self.last_checkpoint = ckpt
            if self.main:
                log.info("resumed from %s at step %d", ckpt, self.start_step)

    def _resume_from(self, resume: str, allow_config_change: bool, allow_max_steps: bool) -> str:
        """The checkpoint to resume from (``"latest"``: the newest intact one of the output dir), after
        checking that the run's config may continue it (``check_resume_config``)."""
        if resume == "latest":
            ckpt = latest_intact_checkpoint(self.output_dir)
            if ckpt is None:
                found = checkpoint_dirs(self.output_dir)
                where = os.path.join(self.output_dir, "checkpoints")
                raise CheckpointError(f"--resume: no intact checkpoint under {where}"
                                      + (f" ({len(found)} damaged: {', '.join(found)})" if found else ""))
        else:
            ckpt = resolve_checkpoint(resume)
        saved = os.path.join(ckpt, "config.yaml")
        changes = check_resume_config(read_yaml(saved, what="checkpoint config"), config_to_dict(self.cfg), saved,
                                      allow_config_change, allow_max_steps)
        if changes and self.main:
            log.info("resuming with changed keys: %s",
                     ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return ckpt

    def _check_outputs(self, model, critic) -> None:
        """One forward pass of the score model and the critic on two training examples before any step,
        so a model that returns the wrong shape fails here (a ``ConfigError`` naming it) and not later
        in a run. Uses its own generator: the run's random draws are unchanged."""
        x = self.source.sample_x0(2, generator=torch.Generator().manual_seed(0)).to(self.acc.device)
        t = torch.full((2,), 0.5, device=self.acc.device)
        where = self.cfg.source or "config"
        # a class-conditional model gets the null label (model.num_classes), which every such model has
        cond = ({"class_labels": torch.full((2,), self.cfg.model.num_classes, dtype=torch.long, device=x.device)}
                if self.cfg.model.num_classes else {})
        try:
            score = model(x, t, **cond)
            if score.shape != x.shape:
                raise ValueError(f"the score model must return [B, *D] = {list(x.shape)}, got {list(score.shape)}")
            if critic is not None:
                critic.potential(x, t, **cond)      # the library checks the critic's [B] output (scalar_per_sample)
        except ValueError as e:
            raise ConfigError(f"{where}: the models fail a check before training: {e}") from None

    # ------------------------------------------------------------------------- one phase
    def _phase(self, step: int, key: int, phase: Phase, unwrapped):
        """``grad_accum`` micro-batches of ``phase.loss`` then one optimizer step; returns ``(mean loss,
        score-model grad norm, critic grad norm)``, the norms before clipping. ``key`` tells the phases of
        one step apart in the seeds (``micro_seed(seed, step, key, j)``); a phase with
        ``trains_model=False`` gets the unwrapped score model ``unwrapped``."""
        acc, cfg = self.acc, self.cfg
        total = None
        models = [self.model] + ([self.critic] if self.critic is not None else [])
        score_model = self.model if phase.trains_model else unwrapped
        for micro in range(cfg.train.grad_accum):
            j = micro * acc.num_processes + acc.process_index
            seed = micro_seed(cfg.train.seed, step, key, j)
            seed_global_rng(seed, acc.device)
            x0 = self.plan.micro(step, j, self._data_gen.manual_seed(seed)).to(acc.device)
            cond = self._labels(step, j)
            # without accumulation every backward syncs and steps: accelerate's context would only add overhead
            with acc.accumulate(*models) if cfg.train.grad_accum > 1 else contextlib.nullcontext():
                loss = phase.loss(score_model, x0, **cond).mean()
                if self._plain and cfg.train.grad_accum == 1:   # what acc.backward does here, minus a division by 1
                    loss.backward()
                else:
                    acc.backward(loss)
                part = loss.detach().float()
                if cfg.train.grad_accum > 1:
                    part = part / cfg.train.grad_accum
                total = part if total is None else total + part
                if acc.sync_gradients:
                    if not phase.trains_model:                      # critic-only step: drop score-model gradients
                        for p in self._score_params:
                            p.grad = None
                    gn, gn_critic = self.clip_gradients()
                    checked = [total, gn] + ([gn_critic] if self.critic is not None else [])
                    # one process: scalar reads; several: every rank stops if any rank saw NaN/Inf
                    if acc.num_processes > 1 or not all(math.isfinite(v.item()) for v in checked):
                        bad = torch.stack(checked).isfinite().logical_not().float()
                        if acc.num_processes > 1:
                            bad = acc.reduce(bad, "sum")
                        if bad.any():
                            self._diverged(step, phase.name, checked, bad)
                    self._optimizer_step()
        return total, gn, gn_critic

    def _labels(self, step: int, j: int) -> dict:
        """``{"class_labels": [micro_batch]}`` for a class-conditional model (``{}`` otherwise), each label
        replaced by the null label ``model.num_classes`` with probability ``train.cond_dropout`` (drawn from
        ``self._data_gen`` after the batch: deterministic in the micro-batch seed)."""
        cfg = self.cfg
        if cfg.model.num_classes == 0:
            return {}
        y = self.plan.labels(step, j)
        if cfg.train.cond_dropout > 0:
            drop = torch.rand(y.shape, generator=self._data_gen) < cfg.train.cond_dropout
            y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)
        return {"class_labels": y.to(self.acc.device)}

    def clip_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the score model's and the critic's gradients separately, each by its own global norm
        (``max_grad_norms``: ``train.clip_grad``, ``critic.clip_grad``), and return the two norms before
        clipping (0 for a model without gradients). Clipping the joint norm would couple the players:
        a large critic gradient would shrink the score model's step, and the other way round."""
        norms = []
        for params, max_norm in zip((self._score_params, self._critic_params), self.max_grad_norms):
            params = [p for p in params if p.grad is not None]
            if not params:
                norms.append(self._zero_norm)
                continue
            gn = self._clip(params, max_norm)
            gn = gn if isinstance(gn, torch.Tensor) else torch.as_tensor(gn, device=self.acc.device)
            norms.append(gn.float())
        return norms[0], norms[1]

    def _clip(self, params, max_norm: float):
        """Clip the gradients' global norm and return it. In plain data parallel without a loss scaler
        accelerate's ``clip_grad_norm_`` is torch's after version and scaler checks, so torch's is
        called directly there; FSDP, DeepSpeed, XLA and fp16 go through accelerate."""
        if self._plain:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.acc.clip_grad_norm_(params, max_norm)

    def _optimizer_step(self):
        """``opt.step(); opt.zero_grad()``. In plain data parallel without a loss scaler accelerate's
        optimizer wrapper only forwards to the torch optimizer, after an uncached importlib lookup
        each call (accelerate 1.15; its cost: BENCHMARKS.md, section "Training driver overhead"), so the
        torch optimizer is called directly there."""
        if self._plain:
            self.opt.optimizer.step()
            self.opt.optimizer.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def _diverged(self, step, term, checked, bad):
        what = f"loss term {term!r}" if bad[0] > 0 else f"gradient norm of loss term {term!r}"
        norms = f"grad norm {float(checked[1]):.4g}"
        if len(checked) > 2:
            norms += f", critic grad norm {float(checked[2]):.4g}"
        msg = (f"non-finite {what} at step {step + 1} (local loss {float(checked[0]):.4g}, {norms}); "
               f"stopped before the update. Last good checkpoint: {self.last_checkpoint or 'none yet'}")
        if self.main:
            self.logbook.log(step, {"diverged": 1.0})
        raise NonFiniteLoss(msg)

    # ------------------------------------------------------------------------- evaluation
    def _eval_model(self):
        """A plain eval-mode copy of the score model (EMA weights if configured)."""
        m = build_score_model(self.cfg, self.sde, self.source.shape, self.spec)
        m.load_state_dict(self.acc.unwrap_model(self.model, keep_fp32_wrapper=False).state_dict())
        if self.cfg.eval.use_ema:
            self.ema.copy_to(m)
        return m.to(self.acc.device).eval()

    def evaluate(self, step: int, samples: bool, diagnostics: bool, final: bool = False,
                 train_seconds: float | None = None) -> dict:
        """Main process only: samples (plot, range check), final quality, diagnostics, with a progress bar
        naming each stage. After ``train_seconds`` of training the sizes are fitted to the time budget
        ``max(eval.budget * train_seconds, eval.min_seconds)`` (gradscore_train/budget.py; the sizes used
        are logged and in the metrics ``eval/*``). Returns the metrics it logged."""
        from tqdm.auto import tqdm

        cfg, ev, out = self.cfg, self.cfg.eval, {}
        budget = EvalBudget(None) if train_seconds is None else EvalBudget.after_training(train_seconds, ev.budget,
                                                                                         ev.min_seconds)
        quality = samples and final and ev.quality
        bar = tqdm(total=int(samples) + int(quality) + int(diagnostics), desc=f"eval step {step}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        model = self._eval_model()
        if samples:
            n, steps = (ev.num_samples if final else min(ev.num_samples, 1000)), ev.sample_steps
            if budget.limited and n * steps > 64 * 20:     # not when the floors of fit_samples are the sizes
                share = budget.remaining() * (0.5 if diagnostics else 1.0)
                fitted = fit_samples(n, steps, self._sampling_cost(model, min(n, 64)), share)
                if fitted != (n, steps):
                    log.info("evaluation at step %d (budget %.0f s): %d samples x %d steps instead of %d x %d",
                             step, budget.seconds, *fitted, n, steps)
                n, steps = fitted
            bar.set_description(f"eval step {step}: sampling {n} x {steps} {ev.method} steps")
            labels = torch.arange(n) % cfg.model.num_classes if cfg.model.num_classes else None
            x = evaluation.draw_samples(model, self.sde, self.source.shape, n, ev.method, steps,
                                        micro_seed(cfg.train.seed, step, 99), self.acc.device, labels=labels,
                                        null_label=cfg.model.num_classes, guidance_scale=cfg.eval.guidance_scale)
            os.makedirs(os.path.join(self.output_dir, "samples"), exist_ok=True)
            path = os.path.join(self.output_dir, "samples", f"step-{step:07d}.png")
            data = self.source.sample_x0(min(n, 1000), generator=torch.Generator().manual_seed(1))
            if len(self.source.shape) == 1:
                evaluation.save_scatter(x, data, path, title=f"{cfg.objective.name}, step {step}")
            else:
                evaluation.save_grid(evaluation.to_pixels(self.source, x), path)
            self.logbook.image(step, "samples", path)
            out.update({"eval/num_samples": n, "eval/sample_steps": steps, **evaluation.range_check(
                x, data, name=f"samples at step {step}")})
            bar.update()
            if quality:
                bar.set_description(f"eval step {step}: sample quality")
                out.update(evaluation.quality(self.source, x, ev, micro_seed(cfg.train.seed, step, 98),
                                              self.acc.device, labels=labels))
                bar.update()
            if final:
                torch.save(x, os.path.join(self.output_dir, "samples", f"step-{step:07d}.pt"))
        if final and cfg.eval.likelihood:
            out.update(evaluation.likelihood(model, self.sde, self.source, cfg.eval,
                                             micro_seed(cfg.train.seed, step, 95), self.acc.device))
        if diagnostics:
            g = torch.Generator().manual_seed(micro_seed(cfg.train.seed, step, 97))
            x0 = self.source.sample_x0(ev.diag_samples, generator=g).to(self.acc.device)
            true = self.source.mixture.score_fn(self.sde) if hasattr(self.source, "mixture") else None
            points = ev.diag_points
            if budget.limited and points > 512:            # a pilot's fixed cost would exceed the savings
                calls = len(ev.diag_times) * (3 if true is not None else 2)
                # never below the data points: each of them is noised at least once, so fewer "points" would be
                # reported than are evaluated
                fitted = fit_points(points, calls, self._diagnostic_cost(model, x0, min(points, 128)),
                                    budget.remaining(), min_points=max(128, x0.shape[0]))
                if fitted != points:
                    log.info("evaluation at step %d (budget %.0f s): diagnostics on %d points instead of %d",
                             step, budget.seconds, fitted, points)
                points = fitted
            bar.set_description(f"eval step {step}: diagnostics at {len(ev.diag_times)} times x {points} points")
            g_dev = torch.Generator(device=self.acc.device).manual_seed(micro_seed(cfg.train.seed, step, 96))
            out.update(evaluation.score_diagnostics(unconditional(cfg, model), self.sde, x0, ev.diag_times,
                                                    true_score=true, generator=g_dev, num_points=points,
                                                    fit_steps=ev.diag_fit_steps,
                                                    solenoidal_points=ev.diag_solenoidal_points))
            out["eval/diag_points"] = points
            bar.update()
        bar.close()
        out["eval/seconds"] = budget.elapsed()
        if budget.limited:
            out["eval/budget_seconds"] = budget.seconds
        self.logbook.log(step, out)
        return out

    def _sampling_cost(self, model, n: int) -> float:
        """Seconds per sample per sampler step, timed on ``n`` samples x 2 steps (its own generator)."""
        t0 = time.perf_counter()
        evaluation.draw_samples(model, self.sde, self.source.shape, n, self.cfg.eval.method, 2, 0, self.acc.device)
        return (time.perf_counter() - t0) / (2 * n)

    def _diagnostic_cost(self, model, x0, points: int) -> float:
        """Seconds per point of one diagnostic call, timed on ``points`` points (its own generator)."""
        g = torch.Generator(device=self.acc.device).manual_seed(0)
        t0 = time.perf_counter()
        # the networks' fits are a fixed cost per call (eval.diag_fit_steps), not per point: the trial fits briefly
        evaluation.score_diagnostics(unconditional(self.cfg, model), self.sde, x0, self.cfg.eval.diag_times[:1],
                                     generator=g, num_points=points, fit_steps=10)
        return (time.perf_counter() - t0) / points            # one decomposition gives both parts

    # ------------------------------------------------------------------------- one optimizer step
    def _step(self, step: int, unwrapped):
        """Optimizer step ``step`` (0-based): warm-up learning rate, the recipe's phases, the EMA update.
        Returns the last phase's ``(loss, score-model grad norm, critic grad norm)``."""
        set_step(step + 1)
        scale = _lr_scale(step, self.cfg.train.warmup_steps)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * scale
        # the recipe's phases in order (critic-only ones first, the joint one last); seed keys: the joint
        # phase 0, the critic-only ones 1, 2, ... (the driver's keys before phases() existed)
        for i, phase in enumerate(self.phases):
            out = self._phase(step, 0 if phase.trains_model else i + 1, phase, unwrapped)
        self.ema.update(unwrapped)
        return out

    def seconds_per_step(self, steps: int, first: int = 0) -> float:
        """Wall seconds per optimizer step over ``steps`` steps from step ``first`` (a pilot: the same code path
        as ``train``, nothing saved or logged; the model's weights move, so time a throw-away Trainer)."""
        unwrapped = self.acc.unwrap_model(self.model)
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        t0 = time.perf_counter()
        for step in range(first, first + steps):
            self._step(step, unwrapped)
        return (time.perf_counter() - t0) / steps

    # ------------------------------------------------------------------------- main loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        config_dict = config_to_dict(cfg)
        if self.main:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config_dict, f, sort_keys=False)
        term = cfg.objective.name
        bar = tqdm(total=cfg.train.max_steps, initial=self.start_step, disable=not (self.main and self.progress),
                   desc=f"train {term}", dynamic_ncols=True)
        loss = gn = gn_critic = torch.zeros(())
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        unwrapped = acc.unwrap_model(self.model)
        last_saved = self.start_step if self.last_checkpoint else None
        t_loop = time.perf_counter()
        t_mark, eval_seconds = t_loop, 0.0     # training time since the last evaluation; time spent evaluating
        for step in range(self.start_step, cfg.train.max_steps):
            loss, gn, gn_critic = self._step(step, unwrapped)
            done = step + 1
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                mean_loss = float(acc.reduce(loss.reshape(1), "mean"))
                if self.main:
                    bar.set_postfix(loss=f"{mean_loss:.4g}")
                    logged = {"train/loss": mean_loss, "train/grad_norm": float(gn),
                              "train/lr": self.opt.param_groups[0]["lr"]}
                    if self.critic is not None:
                        logged["train/critic_grad_norm"] = float(gn_critic)
                    self.logbook.log(done, logged)
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done < cfg.train.max_steps:
                self.last_checkpoint = save_checkpoint(acc, self.output_dir, done, self.model, self.ema, config_dict,
                                                       cfg.train.keep_checkpoints)
                last_saved = done
            ev = cfg.eval
            want_s = ev.sample_every and done % ev.sample_every == 0 and done < cfg.train.max_steps
            want_d = ev.diagnose_every and done % ev.diagnose_every == 0 and done < cfg.train.max_steps
            if (want_s or want_d) and self.main:
                t_eval = time.perf_counter()
                self.evaluate(done, bool(want_s), bool(want_d), train_seconds=t_eval - t_mark)
                t_mark = time.perf_counter()
                eval_seconds += t_mark - t_eval
        bar.close()
        final_step = cfg.train.max_steps
        if last_saved != final_step:
            self.last_checkpoint = save_checkpoint(acc, self.output_dir, final_step, self.model, self.ema, config_dict,
                                                   cfg.train.keep_checkpoints)
        metrics = {"step": final_step}
        t_end = time.perf_counter()
        if final_step > self.start_step:   # wall time of the optimizer steps of this segment (checkpoints included)
            metrics["train/seconds_per_step"] = (t_end - t_loop - eval_seconds) / (final_step - self.start_step)
        metrics["train/loss"] = float(acc.reduce(loss.reshape(1).to(acc.device), "mean"))
        if self.main:
            metrics.update(self.evaluate(final_step, samples=True, diagnostics=True, final=True,
                                         train_seconds=t_end - t_loop - eval_seconds))
            path = os.path.join(self.output_dir, "final_metrics.json")   # its presence means "finished": atomic
            with open(path + ".tmp", "w") as f:
                json.dump({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                           for k, v in metrics.items()}, f, indent=1)
            os.replace(path + ".tmp", path)
        acc.wait_for_everyone()
        stop_guard()                 # every rank is done: a rank that exits first is no failure
        self.logbook.close()
        return metrics


def check_writable(output_dir: str, rank: int = 0) -> None:
    """Create ``output_dir`` and write and remove a file in it; a ``CheckpointError`` naming the folder
    if that fails (before any compute, so a run cannot lose its work to an unwritable folder)."""
    probe = os.path.join(output_dir, f".write-test-{rank}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"output directory {output_dir!r} cannot be written: {e}") from None


def run(config: Config, output_dir: str, resume: str | None = None, max_steps: int | None = None,
        progress: bool = True, allow_config_change: bool = False) -> dict:
    """Train ``config`` into ``output_dir`` and return the final metrics (main process; other ranks
    return the loss and step only).

    Args:
        config: a validated ``Config`` (``gradscore_train.config.load_config``).
        output_dir: where checkpoints, ``metrics.jsonl``, ``tensorboard/``, ``samples/`` go.
        resume: ``"latest"`` (the newest intact checkpoint in ``output_dir``), ``"auto"`` (the same when
            ``output_dir`` has checkpoints, else a fresh start) or a checkpoint folder.
        max_steps: overrides ``train.max_steps`` (the total, counting resumed steps); a resumed run may
            change it.
        allow_config_change: a resumed run may change the keys of ``config.RESUMABLE_CHANGES``
            (length, checkpointing, logging, evaluation); others never (``check_resume_config``).
    In a multi-process run, an error on one rank is reported to the others, which stop
    (``gradscore_train.ranks``).

    Raises:
        ConfigError: the config may not resume the checkpoint (every differing key listed).
        CheckpointError: no intact checkpoint to resume, or one could not be written.
        NonFiniteLoss: a loss or gradient became NaN/Inf (message names the step and the term).
    """
    if resume == "auto":             # requeued jobs: resume when the run has checkpoints, else start
        resume = "latest" if checkpoint_dirs(output_dir) else None
    if max_steps is not None:
        config = copy.deepcopy(config)
        config.train.max_steps = int(max_steps)
    try:
        r = Trainer(config, output_dir, resume, progress, allow_config_change, allow_max_steps=max_steps is not None)
        try:
            return r.train()
        finally:
            r.logbook.close()
    except NonFiniteLoss:        # every rank raises it at the same step (the guard's check is collective)
        raise
    except BaseException as e:   # this rank alone may fail: the others must not wait for it (ranks.py)
        report_failure(e)
        raise
    finally:
        stop_guard()
