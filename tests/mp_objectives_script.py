"""Helper for tests/test_multiprocess_objectives.py, run under
``accelerate launch --multi_gpu --num_processes 2 ...`` (gloo, CPU).

For every registered objective each rank builds identical models (same seed), computes the
single-process gradient of ``objective(model, x0_full).mean()`` on an unwrapped copy, then the
DDP gradient of its half batch through ``accelerator.prepare``-d modules (the critic replaced on the
objective, as a driver does), and compares. t, noise and probes are fixed tensors so both runs see
the same randomness. Two iterations (with an SGD step, plus one ``critic_loss`` step) catch DDP's
"Expected to have finished reduction" errors, which only appear on the second forward.
Writes ``max |grad_ddp - grad_single|`` per objective to ``sys.argv[1]`` (JSON) on rank 0.
"""
import copy
import json
import sys

import torch
from accelerate import Accelerator

import gradscore as gs
from gradscore.objectives.asymmetry import draw_probes
from gradscore_train.train import exit_without_finalization

B, D, ITERS = 16, 2, 2


def build(name, sde):
    torch.manual_seed(0)
    spec = gs.OBJECTIVES[name]
    backbone = gs.TimeMLP(D, 32, 2)
    model = gs.EnergyScore(backbone, sde) if spec.parametrisation == "energy" else gs.ScoreModel(backbone, sde)
    critic = gs.Critic(gs.TimeMLP(D, 32, 2, out_dim=1), sde) if spec.needs_critic else None
    return model, critic


def grads(*modules):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for m in modules if m is not None for p in m.parameters()])


def call(objective, model, x0, t, noise, probes, loss="main"):
    kwargs = {"probe_vectors": probes} if objective.name == "asymmetry" else {}
    fn = objective if loss == "main" else objective.critic_loss
    return fn(model, x0, t=t, noise=noise, **kwargs).mean()


def main(out_path):
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"expected 2 processes, got {world}"
    sde = gs.VPSDE()
    g = torch.Generator().manual_seed(123)
    report = {}
    for name in gs.OBJECTIVES:
        model, critic = build(name, sde)
        ref_model, ref_critic = copy.deepcopy(model), copy.deepcopy(critic)
        ref_obj = gs.build_objective(name, sde, critic=ref_critic)
        obj = gs.build_objective(name, sde, critic=critic)
        params = list(model.parameters()) + (list(critic.parameters()) if critic is not None else [])
        ref_params = list(ref_model.parameters()) + (list(ref_critic.parameters()) if ref_critic is not None else [])
        opt, ref_opt = torch.optim.SGD(params, lr=1e-2), torch.optim.SGD(ref_params, lr=1e-2)
        if critic is not None:
            model, obj.critic, opt = accelerator.prepare(model, critic, opt)
        else:
            model, opt = accelerator.prepare(model, opt)
        worst = 0.0
        half = slice(rank * B // world, (rank + 1) * B // world)
        for _ in range(ITERS):
            x0, noise = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
            t = torch.rand(B, generator=g) * 0.9 + 0.05
            probes = draw_probes((1, B, D), generator=g)
            losses = ["main"] + (["critic"] if obj.critic is not None else [])
            for which in losses:
                ref_opt.zero_grad()
                call(ref_obj, ref_model, x0, t, noise, probes, which).backward()
                opt.zero_grad()
                accelerator.backward(call(obj, model, x0[half], t[half], noise[half], probes[:, half], which))
                unwrapped_critic = accelerator.unwrap_model(obj.critic) if obj.critic is not None else None
                ddp_grads = grads(accelerator.unwrap_model(model), unwrapped_critic)
                diff = (ddp_grads - grads(ref_model, ref_critic)).abs().max()
                worst = max(worst, float(diff))
                opt.step()
                ref_opt.step()
        report[name] = worst
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, report)
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"world": world, "ranks": gathered}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
    # a rank could abort at interpreter exit while a gloo thread releases the last collective's tensors
    # ("terminate called without an active exception"): end without finalization, as the training CLI does
    exit_without_finalization(0)
