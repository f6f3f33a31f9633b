"""Several processes: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) must give ranks
with identical weights, equal to a 1-process run with the same global batch.

Oracle: the loop keys every micro-batch's data and noise on its index j = micro * processes + rank
within the global batch, so 2 processes x 1 micro-batch and 1 process x 2 accumulated micro-batches
compute the same mean gradient; only the summation order differs (DDP averages two gradients, the
single process accumulates loss/2 twice), a float32 rounding difference of ~1e-7 relative, which
Adam can amplify for near-zero gradients over 3 steps: tolerance 1e-5. Ranks must agree exactly
(DDP broadcasts the initial weights and all-reduces every gradient).

This file is also the script the test launches (see __main__).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("toy", o) for o in ("l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry")] + \
        [("digits", "energy"), ("digits", "dual_sobolev")]


def case_config(kind: str, objective: str, grad_accum: int):
    from gradscore_train.config import load_config

    common = ["train.batch_size=8", f"train.grad_accum={grad_accum}", "train.max_steps=3", "train.checkpoint_every=0",
              "train.warmup_steps=0", "train.lr=1e-3", "eval.quality=false", "eval.num_samples=8",
              "eval.sample_steps=2", "eval.diag_times=[]", "train.mixed_precision=no"]
    if kind == "digits":
        common += ["data.max_images=64", "model.block_out_channels=[16,32]", "critic.block_out_channels=[8,16]"]
    else:
        common += ["model.hidden=32", "model.depth=2", "critic.hidden=32", "critic.depth=2"]
    return load_config(os.path.join(ROOT, "configs", kind, f"{objective}.yaml"), common)


def train_case(kind, objective, grad_accum, out_root):
    """Train one case; returns (process index, flat parameters of score model and critic)."""
    from gradscore_train.loop import Trainer

    tr = Trainer(case_config(kind, objective, grad_accum), os.path.join(out_root, f"{kind}-{objective}"), None, False)
    tr.train()
    params = list(tr.acc.unwrap_model(tr.model).parameters())
    if tr.critic is not None:
        params += list(tr.acc.unwrap_model(tr.critic).parameters())
    return tr.acc.process_index, torch.cat([p.detach().flatten() for p in params])



@pytest.mark.slow
def test_two_processes_match_each_other_and_one_process(tmp_path, free_port):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), os.path.abspath(__file__), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for kind, objective in CASES:
        r0 = torch.load(out / f"{kind}-{objective}-rank0.pt")
        r1 = torch.load(out / f"{kind}-{objective}-rank1.pt")
        assert torch.equal(r0, r1), f"{kind}/{objective}: ranks differ by {float((r0 - r1).abs().max())}"
        _, single = train_case(kind, objective, 2, str(tmp_path / "single"))
        diff = float((single - r0).abs().max())
        assert diff < 1e-5, f"{kind}/{objective}: 2 processes vs 1 process (same global batch) differ by {diff}"
        init = torch.load(out / f"{kind}-{objective}-init.pt")
        assert float((r0 - init).abs().max()) > 1e-4, f"{kind}/{objective}: weights did not move"


if __name__ == "__main__":   # run under accelerate launch by the test above
    out_root = sys.argv[1]
    os.makedirs(out_root, exist_ok=True)
    for kind, objective in CASES:
        from gradscore_train.build import build_critic, build_score_model, build_sde, check_objective_config
        rank, flat = train_case(kind, objective, 1, out_root)
        torch.save(flat, os.path.join(out_root, f"{kind}-{objective}-rank{rank}.pt"))
        if rank == 0:   # the initial weights, to check training moved them
            from gradscore_train.data import build_source
            cfg = case_config(kind, objective, 1)
            spec, sde, src = check_objective_config(cfg), build_sde(cfg), build_source(cfg.data)
            torch.manual_seed(cfg.train.seed)
            m = build_score_model(cfg, sde, src.shape, spec)
            ps = list(m.parameters())
            if spec.needs_critic:
                ps += list(build_critic(cfg, sde, src.shape).parameters())
            torch.save(torch.cat([p.detach().flatten() for p in ps]),
                       os.path.join(out_root, f"{kind}-{objective}-init.pt"))
    # a rank could abort at interpreter exit while a gloo thread releases the last collective's tensors
    # ("terminate called without an active exception"): end without finalization, as the training CLI does
    from gradscore_train.train import exit_without_finalization
    exit_without_finalization(0)
