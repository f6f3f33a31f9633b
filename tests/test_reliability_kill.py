"""Kill at any moment (issue 15, item 1): a training run killed with SIGKILL at random moments, during
steps, checkpoint writes and the final evaluation alike, and resumed each time ends with the weights
of an uninterrupted run. Oracle: bitwise equality (max diff 0 on CPU): every random draw is a function
of (seed, step), a checkpoint becomes visible only complete (atomic rename) and is verified when read.

The kills: up to four (at least three must land), at a uniform random delay in [0, 2] s after the
launch has logged its first step (60 steps with a checkpoint after each take ~3-6 s, then the final
evaluation ~3 s), except the second, which comes as soon as a checkpoint's temporary folder appears
(mid-write). Each launch is the training CLI in a forked child with ``--resume auto`` (a fresh start
until a checkpoint exists). A launch that resumes at the last step only evaluates; a kill may miss it.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
ARGS = ["--config", "configs/toy/dual_sobolev.yaml", "--max-steps", str(STEPS), "--no-progress",
        "train.batch_size=16", "model.hidden=16", "model.depth=2", "critic.hidden=16", "critic.depth=2",
        "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=2",
        "eval.num_samples=8",
        "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.diag_points=256",
        "eval.quality=false", "train.mixed_precision=no"]


def _cli(argv):
    from gradscore_train.train import main
    os._exit(main(argv))


def _start(out):
    """The training CLI with ``--resume auto`` in a forked child (the imports are done once, in this process)."""
    argv = ["--output-dir", str(out), *ARGS, "--resume", "auto"]
    proc = multiprocessing.get_context("fork").Process(target=_cli, args=(argv,))
    proc.start()
    return proc


def _size(path) -> int:
    return path.stat().st_size if path.exists() else 0


def _final_weights(out):
    ck = os.path.join(out, "checkpoints", f"step-{STEPS:07d}")
    return {f"{name}.{k}": v for name in ("score_model", "ema", "model", "model_1")
            for k, v in load_file(os.path.join(ck, f"{name}.safetensors")).items()}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    import gradscore_train.loop  # noqa: F401  (imported before the children fork)
    ref = _start(tmp_path / "ref")
    ref.join(timeout=300)
    assert ref.exitcode == 0
    rng, out, kills, where = random.Random(0), tmp_path / "killed", 0, []
    ckdir = out / "checkpoints"
    for _ in range(10):                                      # at most 10 launches
        proc = _start(out)
        if kills < 4:
            if kills == 1:       # this kill: as soon as a checkpoint is being written (its temporary folder exists)
                deadline = time.monotonic() + 60
                while proc.is_alive() and time.monotonic() < deadline and not (
                        ckdir.is_dir() and any(n.startswith(".tmp") for n in os.listdir(ckdir))):
                    time.sleep(0.001)
            else:                # a random moment once this launch trains (its first step is logged)
                metrics, size = out / "metrics.jsonl", _size(out / "metrics.jsonl")
                deadline = time.monotonic() + 60
                while proc.is_alive() and time.monotonic() < deadline and _size(metrics) <= size:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 2.0))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                kills += 1
                where.append(sorted(os.listdir(ckdir)) if ckdir.is_dir() else [])
                continue
        proc.join(timeout=300)
        assert proc.exitcode == 0
        if (out / "final_metrics.json").exists():
            break
    print("checkpoint folders at the kills:", where)
    assert kills >= 3, f"only {kills} kills landed (the runs ended first): {where}"
    assert any(n.startswith(".tmp") for n in where[1]), f"the second kill missed the checkpoint write: {where}"
    assert (out / "final_metrics.json").exists()
    a, b = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed run differs by {diff} after kills at {where}"
