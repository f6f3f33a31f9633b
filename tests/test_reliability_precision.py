"""bf16 autocast on CPU for every objective (issue 15, item 8), against float32.

Oracle: the same weights, data and noise in float32 and under ``torch.autocast("cpu", torch.bfloat16)``.
bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); the linear layers run in bf16 (checked),
the tensors differentiated with respect to (x_t for energies, critics and the asymmetry penalty) and the
gradients ``autograd.grad`` returns stay float32 (docs/engineering.md, "Mixed precision"; checked).
Measured relative differences on this problem (toy MLPs, 256 points): loss <= 7.3e-3 (the dual Sobolev
critic's loss), parameter gradients <= 4.2e-3. Tolerance: 3e-2 for both, ~8 roundoffs.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import gradscore as gs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 3e-2


def _build(name, sde):
    torch.manual_seed(0)
    spec = gs.OBJECTIVES[name]
    backbone = gs.TimeMLP(2, 32, 2)
    model = gs.EnergyScore(backbone, sde) if spec.parametrisation == "energy" else gs.ScoreModel(backbone, sde)
    critic = gs.Critic(gs.TimeMLP(2, 32, 2, out_dim=1), sde) if spec.needs_critic else None
    return gs.build_objective(name, sde, critic=critic), model, critic


@pytest.mark.parametrize("name", list(gs.OBJECTIVES))
def test_bf16_autocast_matches_fp32_with_fp32_input_gradients(name, monkeypatch):
    sde = gs.VPSDE()
    obj, model, critic = _build(name, sde)
    params = list(model.parameters()) + (list(critic.parameters()) if critic is not None else [])
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 2
    grads_of, linear_dtypes = [], set()
    real_grad = torch.autograd.grad

    def recording_grad(outputs, inputs, *args, **kwargs):
        out = real_grad(outputs, inputs, *args, **kwargs)
        ins = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        grads_of.append(([i.dtype for i in ins], [g.dtype for g in out if g is not None]))
        return out

    for m in [model] + ([critic] if critic is not None else []):
        for layer in m.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda mod, i, o: linear_dtypes.add(o.dtype))
    for phase in obj.phases()[-2:]:             # a critic-only phase (if any) and the joint one
        result = {}
        for bf16 in (False, True):
            for p in params:
                p.grad = None
            grads_of.clear()
            linear_dtypes.clear()
            torch.manual_seed(5)                 # the same t and noise in both precisions
            monkeypatch.setattr(torch.autograd, "grad", recording_grad)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = phase.loss(model, x0).mean()
            monkeypatch.setattr(torch.autograd, "grad", real_grad)
            loss.backward()
            g = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
            result[bf16] = (loss.detach(), g)
            if bf16:
                assert linear_dtypes == {torch.bfloat16}, f"{name}: autocast not active ({linear_dtypes})"
                assert loss.dtype == torch.float32
                for ins, outs in grads_of:            # energy, critic and penalty gradients taken in fp32
                    assert set(ins) == {torch.float32} and set(outs) <= {torch.float32}, (name, ins, outs)
        (l32, g32), (l16, g16) = result[False], result[True]
        assert float((l16 - l32).abs() / l32.abs()) < TOL, f"{name}/{phase.name}: loss {float(l16)} vs {float(l32)}"
        assert float((g16 - g32).norm() / g32.norm()) < TOL, f"{name}/{phase.name}: gradients differ"
    if gs.OBJECTIVES[name].parametrisation == "energy" or critic is not None or name == "asymmetry":
        assert grads_of, f"{name}: expected an input gradient (autograd.grad)"


@pytest.mark.slow
def test_driver_trains_every_objective_in_bf16_on_cpu(tmp_path):
    """train.mixed_precision=bf16 through accelerate on CPU: the first step's logged loss (same initial
    weights, data and noise) agrees with the float32 run's within TOL, and training stays finite."""
    from accelerate.state import AcceleratorState

    from gradscore_train.config import load_config
    from gradscore_train.loop import Trainer

    common = ["train.batch_size=64", "model.hidden=32", "model.depth=2", "critic.hidden=32", "critic.depth=2",
              "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=0", "eval.num_samples=8",
              "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.diag_points=256",
              "eval.quality=false", "train.max_steps=2"]
    for name in gs.OBJECTIVES:
        first = {}
        for mp in ("no", "bf16"):
            AcceleratorState._reset_state(reset_partial_state=True)   # a new mixed-precision mode in one process
            cfg = load_config(os.path.join(ROOT, "configs", "toy", f"{name}.yaml"),
                              common + [f"train.mixed_precision={mp}"])
            out = tmp_path / f"{name}-{mp}"
            tr = Trainer(cfg, str(out), None, False)
            assert tr.acc.mixed_precision == mp
            metrics = tr.train()
            tr.logbook.close()
            assert torch.isfinite(torch.tensor(metrics["train/loss"])), (name, mp)
            rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
            first[mp] = next(r["train/loss"] for r in rows if r.get("step") == 1 and "train/loss" in r)
        assert abs(first["bf16"] - first["no"]) / abs(first["no"]) < TOL, (name, first)
    AcceleratorState._reset_state(reset_partial_state=True)
