"""Several machines (issue 15, item 5): ``accelerate launch --num_machines 2 --machine_rank R
--main_process_ip 127.0.0.1`` started twice on this machine (one process per "machine", CPU, gloo)
forms one 2-process run, equal to one process with the same global batch.

Oracle (as tests/test_train_distributed.py): the data and noise of micro-batch j = micro * processes +
rank do not depend on the split, so 2 machines x 1 process and 1 process x 2 accumulated micro-batches
compute the same mean gradient up to float32 summation order (~1e-7 relative), which Adam can amplify
for near-zero gradients over 3 steps: tolerance 1e-5. Had the two launches not joined one process
group, each would refuse to run (WORLD_SIZE=2 but accelerate sees 1: gradscore_train.ranks).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/toy/l2.yaml", "--max-steps", "3", "--no-progress", "train.batch_size=8",
        "model.hidden=16", "model.depth=2", "train.warmup_steps=0", "train.checkpoint_every=0", "eval.num_samples=8",
        "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.diag_points=256",
        "eval.quality=false", "train.mixed_precision=no"]


@pytest.mark.slow
def test_two_machines_equal_one_process_with_the_same_global_batch(tmp_path, free_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
              "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port),
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    procs = [subprocess.Popen([*launch, "--machine_rank", str(r), "-m", "gradscore_train.train", "--output-dir",
                               str(tmp_path / "two"), *ARGS], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    from gradscore_train.config import load_config
    from gradscore_train.loop import run
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), ARGS[5:] + ["train.grad_accum=2"])
    run(cfg, str(tmp_path / "one"), max_steps=3, progress=False)
    for name in ("score_model", "ema"):
        a = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000003" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000003" / f"{name}.safetensors"))
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < 1e-5, f"{name}: 2 machines vs 1 process differ by {diff}"
