"""Kill at any moment (issue 15, item 1): a training run killed with SIGKILL four times, during steps,
during a checkpoint write and during the final evaluation, and resumed each time ends with the weights
of an uninterrupted run. Oracle: bitwise equality (max diff 0 on CPU): every random draw is a function
of (seed, step), a checkpoint becomes visible only complete (atomic rename) and is verified when read.

The kills are placed by what the run has done, not by the clock (a fast machine finished the 60 steps
before a clock-placed kill landed): (1) a random delay of up to 30 ms after a random step in [5, 20] is
logged, (2) as soon as this launch's first checkpoint temporary folder appears (mid-write; stale
temporary folders of earlier kills are removed first so the wait sees this launch's), (3) as (1) for a
step in [35, 50], (4) a random moment up to 1 s into the final evaluation (after step 60 is logged; the
evaluation takes ~3 s). Each launch is the training CLI in a forked child with ``--resume auto``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
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


def _last_step(path) -> int:
    """The largest step logged so far in ``metrics.jsonl`` (-1 before the first; a half-written line is skipped)."""
    best = -1
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass
    return best


def _wait(proc, done, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.is_alive(), f"the launch ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.001)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    import gradscore_train.loop  # noqa: F401  (imported before the children fork)
    ref = _start(tmp_path / "ref")
    ref.join(timeout=300)
    assert ref.exitcode == 0
    rng, out = random.Random(0), tmp_path / "killed"
    ckdir, metrics = out / "checkpoints", out / "metrics.jsonl"
    where = []
    for kill in range(4):
        if kill == 1 and ckdir.is_dir():
            for name in os.listdir(ckdir):
                if name.startswith(".tmp"):
                    shutil.rmtree(ckdir / name)
        proc = _start(out)
        if kill in (0, 2):
            step = rng.randint(5, 20) if kill == 0 else rng.randint(35, 50)
            _wait(proc, lambda s=step: _last_step(metrics) >= s, f"step {step} logged")
            time.sleep(rng.uniform(0.0, 0.03))
        elif kill == 1:
            _wait(proc, lambda: ckdir.is_dir() and any(n.startswith(".tmp") for n in os.listdir(ckdir)),
                  "checkpoint write")
        else:
            _wait(proc, lambda: _last_step(metrics) >= STEPS, f"step {STEPS} logged")
            time.sleep(rng.uniform(0.0, 1.0))
        assert proc.is_alive(), f"kill {kill + 1} came too late: the launch had ended"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        where.append(sorted(os.listdir(ckdir)) if ckdir.is_dir() else [])
    assert not (out / "final_metrics.json").exists(), f"the run finished before the last kill: {where}"
    proc = _start(out)
    proc.join(timeout=300)
    assert proc.exitcode == 0
    print("checkpoint folders at the kills:", where)
    assert any(n.startswith(".tmp") for n in where[1]), f"the second kill missed the checkpoint write: {where}"
    assert (out / "final_metrics.json").exists()
    a, b = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed run differs by {diff} after kills at {where}"
