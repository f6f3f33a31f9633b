"""The driver's per-step fast paths (benchmarks/driver_overhead.py) compute what the plain code does.

* EMA: one ``torch._foreach_lerp_`` over cached lists against the per-parameter ``lerp_`` loop it
  replaced: bitwise (the same elementwise formula; tolerance 0).
* AdamW: the fused kernel (``gradscore_train.loop.make_optimizer``) against torch's default implementation,
  same parameters and gradients, 20 steps: within 1e-6 relative (both evaluate Adam's update in
  float32 in a different operation order, so they may differ by a few ulps per step).
* ``micro_seed``: deterministic, distinct over a run's (step, phase, micro-batch) grid, 63 bits.
* The non-finite guard on the single-process path: a finite loss with an infinite gradient stops the
  run before the update and names the gradient norm.
* The two players of the min-max (score model, critic) are clipped by their own gradient norms and
  decayed by their own weight decay.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from gradscore.nets import TimeMLP
from gradscore.objectives import Objective
from gradscore_train.config import load_config
from gradscore_train.data import micro_seed
from gradscore_train.ema import EMA
from gradscore_train.loop import NonFiniteLoss, Trainer, make_optimizer, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ema_foreach_update_is_bitwise_the_per_parameter_loop():
    torch.manual_seed(0)
    model = TimeMLP(2, 32, 2)
    ema = EMA(model, 0.99)
    reference = {k: v.clone() for k, v in ema.shadow.items()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        for k, p in model.named_parameters():
            reference[k].lerp_(p.detach().float(), 1 - d)
    assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)
    # a model in another dtype takes the per-tensor path (cast to the fp32 shadow)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ema2 = EMA(half, 0.5)
    ema2.update(half)
    assert all(v.dtype == torch.float32 for v in ema2.shadow.values())


def test_fused_adamw_matches_the_default_implementation():
    torch.manual_seed(0)
    a = TimeMLP(2, 32, 2)
    b = copy.deepcopy(a)
    fused = make_optimizer(a.parameters(), 1e-2, 1e-2)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    assert fused.defaults["fused"] is True
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in a.parameters()]
        for m, opt in ((a, fused), (b, plain)):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), float((p - q).abs().max())


def test_micro_seed_is_deterministic_distinct_and_63_bit():
    seeds = [micro_seed(0, step, phase, j) for step in range(2000) for phase in range(3) for j in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert micro_seed(0, 5, 1, 2) == micro_seed(0, 5, 1, 2) != micro_seed(1, 5, 1, 2)
    assert micro_seed(0, 1, 2) != micro_seed(0, 2, 1)                 # order matters


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class _InfGradientAfter(Objective):
    """Wraps an objective without a critic: from call ``k`` on the loss stays finite but its gradient is
    infinite. Its ``phases()`` (the base class's) is the one joint phase calling the wrapper."""

    def __init__(self, inner, k):
        assert inner.n_critic == 0, "the wrapper has no critic_loss"
        self.inner, self.k, self.calls = inner, k, 0
        self.name, self.hparams = inner.name, inner.hparams

    def __call__(self, model, x0):
        self.calls += 1
        loss = self.inner(model, x0)
        return _InfGrad.apply(loss) if self.calls > self.k else loss


def test_guard_stops_on_an_infinite_gradient_with_a_finite_loss(tmp_path, monkeypatch):
    import gradscore_train.loop as loop

    real = loop.objective_from_config
    monkeypatch.setattr(loop, "objective_from_config",
                        lambda cfg, sde, critic=None: _InfGradientAfter(real(cfg, sde, critic), 3))
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"),
                      ["train.checkpoint_every=0", "eval.quality=false", "train.batch_size=16", "model.hidden=16",
                       "model.depth=2"])
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm of loss term 'l2' at step 4"):
        run(cfg, str(tmp_path), max_steps=10, progress=False)


def _set_gradients(params, norm: float, generator) -> list[torch.Tensor]:
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    scale = norm / float(torch.cat([g.flatten() for g in grads]).norm())
    for p, g in zip(params, grads):
        p.grad = g * scale
    return [p.grad.clone() for p in params]


def _global_norm(tensors) -> float:
    return float(torch.cat([t.flatten() for t in tensors]).norm())


@pytest.mark.parametrize("critic_clip, critic_max_norm", [("critic.clip_grad=0.5", 0.5), (None, 2.0)])
def test_score_model_and_critic_are_clipped_and_decayed_separately(tmp_path, critic_clip, critic_max_norm):
    """Oracle: the score model's gradient norm (0.3) is below its threshold (train.clip_grad=2) and the
    critic's (40) far above its own (critic.clip_grad, or train.clip_grad when unset). Clipped
    separately, the score model's gradients stay bitwise as they were (a joint clip would have scaled
    them by 2 / 40.001) and the critic's are scaled to exactly its threshold (float32 rounding: 1e-5
    relative); the returned norms are the two norms before clipping. Weight decay is per parameter
    group: train.weight_decay for the score model, critic.weight_decay (default 0) for the critic."""
    overrides = ["train.clip_grad=2.0", "train.weight_decay=0.01", "model.hidden=16", "model.depth=2",
                 "critic.hidden=8", "critic.depth=2", "eval.quality=false"] + ([critic_clip] if critic_clip else [])
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2+dual_sobolev.yaml"), overrides)
    tr = Trainer(cfg, str(tmp_path), None, False)
    assert [g["weight_decay"] for g in tr.opt.param_groups] == [0.01, 0.0]
    score, critic = list(tr.model.parameters()), list(tr.critic.parameters())
    g = torch.Generator().manual_seed(0)
    score_before, critic_before = _set_gradients(score, 0.3, g), _set_gradients(critic, 40.0, g)
    gn, gn_critic = tr.clip_gradients()
    assert float(gn) == pytest.approx(0.3, rel=1e-5) and float(gn_critic) == pytest.approx(40.0, rel=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(score, score_before))
    assert _global_norm([p.grad for p in critic]) == pytest.approx(critic_max_norm, rel=1e-5)
    ratio = torch.cat([(p.grad / b).flatten() for p, b in zip(critic, critic_before)])   # one common factor
    assert torch.allclose(ratio, torch.full_like(ratio, critic_max_norm / 40.0), rtol=1e-5)


def test_critic_betas_are_the_critic_groups_own(tmp_path):
    """critic.betas sets AdamW's (beta1, beta2) of the critic's parameter group only (the score model keeps torch's
    default), survives the optimizer's state dict, and a malformed value is refused by name."""
    from gradscore_train.config import ConfigError

    base = ["model.hidden=16", "model.depth=2", "critic.hidden=8", "critic.depth=2", "eval.quality=false"]
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "dual_sobolev.yaml"), base + ["critic.betas=[0.5, 0.9]"])
    tr = Trainer(cfg, str(tmp_path), None, False)
    assert [g["betas"] for g in tr.opt.param_groups] == [(0.9, 0.999), (0.5, 0.9)]
    assert [g["betas"] for g in tr.opt.state_dict()["param_groups"]] == [(0.9, 0.999), (0.5, 0.9)]
    with pytest.raises(ConfigError, match="critic.betas"):
        load_config(os.path.join(ROOT, "configs", "toy", "dual_sobolev.yaml"), base + ["critic.betas=[0.5, 1.0]"])


def test_both_gradient_norms_are_logged(tmp_path):
    """A critic objective logs the score model's and the critic's gradient norms, both finite and > 0."""
    import json

    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2+dual_sobolev.yaml"),
                      ["model.hidden=16", "model.depth=2", "critic.hidden=8", "critic.depth=2", "train.batch_size=16",
                       "train.log_every=1", "train.checkpoint_every=0", "eval.quality=false", "eval.num_samples=8",
                       "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]"])
    run(cfg, str(tmp_path), max_steps=2, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["train/grad_norm"] < float("inf") and 0 < r["train/critic_grad_norm"] < float("inf")


def test_the_driver_step_is_the_objectives_phases_in_order(tmp_path, monkeypatch):
    """One driver step runs ``objective.phases()`` in order, one optimizer step each: for dual_sobolev
    with n_critic=3 two critic-only phases, then the joint one. Oracle on the weights each phase sees:
    a critic-only phase moves the critic but leaves the score model bitwise as it was (its gradients
    are dropped, AdamW skips parameters without gradient), the joint phase moves both."""
    import gradscore_train.loop as loop
    from gradscore.objectives import Phase

    def snapshot(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()

    calls = []
    real = loop.objective_from_config

    def recording(cfg, sde, critic=None):
        objective = real(cfg, sde, critic)
        base_phases = objective.phases

        def phases():
            def recorded(phase):
                def loss(model, x0, **kwargs):
                    calls.append((phase.name, phase.trains_model, snapshot(model), snapshot(objective.critic)))
                    return phase.loss(model, x0, **kwargs)
                return Phase(phase.name, loss, phase.trains_model)
            return tuple(recorded(phase) for phase in base_phases())

        objective.phases = phases
        return objective

    monkeypatch.setattr(loop, "objective_from_config", recording)
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "dual_sobolev.yaml"),
                      ["objective.hparams.n_critic=3", "model.hidden=16", "model.depth=2", "critic.hidden=8",
                       "critic.depth=2", "train.batch_size=16", "train.warmup_steps=0", "train.checkpoint_every=0",
                       "eval.quality=false", "eval.num_samples=8", "eval.sample_steps=2", "eval.diag_samples=16",
                       "eval.diag_times=[0.5]"])
    run(cfg, str(tmp_path), max_steps=2, progress=False)
    recipe = [("critic_loss", False), ("critic_loss", False), ("dual_sobolev", True)]
    assert [(name, trains) for name, trains, _, _ in calls] == recipe * 2
    for (_, trains_model, score, critic), (_, _, score_next, critic_next) in zip(calls, calls[1:]):
        assert torch.equal(score, score_next) != trains_model
        assert not torch.equal(critic, critic_next)


def test_the_one_critic_step_recipe_trains_as_its_config_says(tmp_path):
    """configs/toy/dual_sobolev_one_critic_step.yaml (issue 16 item 3: dual_sobolev alone at one joint step per
    score step) is what BENCHMARKS.md measured: one phase per driver step (n_critic = 1), the score model's group at
    lr 1e-3 with torch's betas, the 48-wide critic's at lr 3e-3 with betas (0, 0.9); one driver step moves both."""
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "dual_sobolev_one_critic_step.yaml"),
                      ["eval.quality=false", "train.log_every=1000000", "train.checkpoint_every=0"])
    tr = Trainer(cfg, str(tmp_path), None, False)
    assert [p.name for p in tr.phases] == ["dual_sobolev"] and tr.objective.n_critic == 1
    assert [(g["lr"], g["betas"]) for g in tr.opt.param_groups] == [(1e-3, (0.9, 0.999)), (3e-3, (0.0, 0.9))]
    assert tr.critic.backbone.net[0].out_features == 48
    before = [torch.cat([p.detach().flatten() for p in m.parameters()]).clone() for m in (tr.model, tr.critic)]
    tr.seconds_per_step(1, first=60)                     # past the warm-up: both learning rates at full size
    after = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (tr.model, tr.critic)]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_driver_step_benchmark_reports_each_config_against_the_first(tmp_path, monkeypatch):
    """benchmarks/driver_step.py: one row per config with its n_critic, the first config's ratio exactly 1 (each
    round divides by itself), and BENCHMARKS.md's targets table reads the recipe's row against the 2x target."""
    import sys

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)
    sys.modules.pop("benchmarks", None)
    from benchmarks import benchmarks_md, driver_step

    configs = ("configs/toy/l2.yaml", "configs/toy/dual_sobolev_one_critic_step.yaml")
    rows = driver_step.run(configs, steps=2, rounds=2, log=lambda *a: None)
    assert [r["config"] for r in rows] == list(configs) and [r["n_critic"] for r in rows] == [0, 1]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ms"] > 0
    target = benchmarks_md.targets_table({"cases": {}, "driver_step": rows})
    assert "configs/toy/dual_sobolev_one_critic_step.yaml" in target and f"{rows[1]['ratio']:.2f}x" in target
    assert "| configs/toy/l2.yaml | - |" in driver_step.table(rows)
