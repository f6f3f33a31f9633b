"""The training loop in one process: exact resume, the NaN/Inf guard, crash-safe checkpoints,
every objective on the digits UNet, the CIFAR-10 config on a generated imagefolder, the CLI.

Resume oracle: all randomness is a function of (seed, step, micro-batch) and the checkpoint holds
model, optimizer and EMA, so a run stopped at step 3 and resumed to 6 must end with the weights
of an uninterrupted 6-step run: bitwise on CPU (tolerance 1e-6 allowed by the brief, 0 observed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gradscore.objectives import Objective
from gradscore_train.checkpoint import checkpoint_dirs, latest_checkpoint, read_step, save_checkpoint
from gradscore_train.config import load_config
from gradscore_train.loop import NonFiniteLoss, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.checkpoint_every=0", "train.warmup_steps=2", "eval.num_samples=16", "eval.sample_steps=2",
        "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.quality=false", "train.log_every=1"]
TOY = ["train.batch_size=16", "model.hidden=32", "model.depth=2", "critic.hidden=32", "critic.depth=2"]
DIGITS = ["train.batch_size=16", "data.max_images=40", "model.block_out_channels=[16,32]",
          "critic.block_out_channels=[8,16]"]


def cfg_for(kind, objective, *extra):
    return load_config(os.path.join(ROOT, "configs", kind, f"{objective}.yaml"),
                       FAST + (TOY if kind == "toy" else DIGITS) + list(extra))


def weights(run_dir):
    ck = latest_checkpoint(str(run_dir))
    return {**{f"model.{k}": v for k, v in load_file(os.path.join(ck, "score_model.safetensors")).items()},
            **{f"ema.{k}": v for k, v in load_file(os.path.join(ck, "ema.safetensors")).items()},
            **{f"acc.{k}": v for k, v in load_file(os.path.join(ck, "model.safetensors")).items()}}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind,objective", [("toy", "dual_sobolev"), ("digits", "l2")])
def test_resume_reproduces_uninterrupted_run(tmp_path, kind, objective):
    # digits: 40 images, 16 per step, so the epoch boundary (a new permutation) falls inside both halves
    cfg = cfg_for(kind, objective, "train.grad_accum=2")
    full = run(cfg, str(tmp_path / "full"), max_steps=6, progress=False)
    run(cfg, str(tmp_path / "part"), max_steps=3, progress=False)
    assert read_step(latest_checkpoint(str(tmp_path / "part"))) == 3
    resumed = run(cfg, str(tmp_path / "part"), max_steps=6, resume="latest", progress=False)
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "part")) <= 1e-6
    assert resumed["train/loss"] == pytest.approx(full["train/loss"], abs=1e-6)
    # the logged losses of steps 4-6 agree too (same data, same noise)
    def losses(d):
        rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    lf, lp = losses(tmp_path / "full"), losses(tmp_path / "part")
    for s in (4, 5, 6):
        assert lp[s] == pytest.approx(lf[s], abs=1e-6)


class _NaNAfter(Objective):
    """Wraps an objective without a critic: per-sample losses become NaN from call ``k`` on (a diverging
    run). Its ``phases()`` (the base class's) is the one joint phase calling the wrapper."""

    def __init__(self, inner, k):
        assert inner.n_critic == 0, "the wrapper has no critic_loss"
        self.inner, self.k, self.calls = inner, k, 0
        self.name, self.hparams = inner.name, inner.hparams

    def __call__(self, model, x0):
        self.calls += 1
        loss = self.inner(model, x0)
        return loss * float("nan") if self.calls > self.k else loss


def test_nan_guard_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    import gradscore_train.loop as loop

    real = loop.objective_from_config
    monkeypatch.setattr(loop, "objective_from_config",
                        lambda cfg, sde, critic=None: _NaNAfter(real(cfg, sde, critic), 4))
    cfg = cfg_for("toy", "l2", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss term 'l2' at step 5 .*step-0000004"):
        run(cfg, str(tmp_path), max_steps=10, progress=False)
    ck = latest_checkpoint(str(tmp_path))
    assert read_step(ck) == 4
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["step-0000002", "step-0000004"]
    w = load_file(os.path.join(ck, "score_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]
    # the intact checkpoint resumes (with the real objective)
    monkeypatch.setattr(loop, "objective_from_config", real)
    out = run(cfg, str(tmp_path), max_steps=6, resume="latest", progress=False)
    assert out["step"] == 6 and out["train/loss"] == out["train/loss"]


def test_partial_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    cfg = cfg_for("toy", "l2", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    run(cfg, str(tmp_path), max_steps=4, progress=False)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["step-0000003", "step-0000004"]
    crashed = tmp_path / "checkpoints" / ".tmp-step-0000005"          # a save that died mid-write
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"truncated")
    assert read_step(latest_checkpoint(str(tmp_path))) == 4
    assert run(cfg, str(tmp_path), max_steps=5, resume="latest", progress=False)["step"] == 5


def test_checkpoint_is_renamed_only_after_every_rank_has_saved(tmp_path, monkeypatch):
    """``save_state`` is collective and every rank writes its own files (its random state) into the
    temporary folder, so the main process may rename that folder only after a barrier that follows
    ``save_state``. Without it, 2-process runs of the CLI failed 6 times in 40 with rank 1's "Parent
    directory .../.tmp-step-0000003 does not exist". Oracle: the order of the calls seen by a recording
    accelerator (one process plays the main rank; the other rank's file is written by its save_state)."""
    events = []

    class RecordingAccelerator:
        is_main_process = True

        def wait_for_everyone(self):
            events.append("barrier")

        def save_state(self, path):
            events.append("save_state")
            open(os.path.join(path, "random_states_1.pkl"), "w").close()

        def unwrap_model(self, model):
            return model

    real_replace = os.replace

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    final = save_checkpoint(RecordingAccelerator(), str(tmp_path), 3, torch.nn.Linear(2, 2), None, {"seed": 0}, 2)
    assert events == ["barrier", "save_state", "barrier", "rename", "barrier"]
    assert os.path.isfile(os.path.join(final, "random_states_1.pkl")) and read_step(final) == 3


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry"])
def test_every_objective_trains_on_digits_unet(tmp_path, objective):
    out = run(cfg_for("digits", objective, "train.batch_size=8", "eval.quality=true",
                      f"eval.classifier_cache={tmp_path / 'cls'}"), str(tmp_path), max_steps=2, progress=False)
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    assert out["quality/classifier_fd"] > 0
    assert 0 <= out["quality/class_coverage"] <= 1 and sum(out[f"quality/class_share/{k}"] for k in range(10)) <= 1
    assert os.path.isfile(tmp_path / "samples" / "step-0000002.png")


def _write_imagefolder(root, n_per_class=6, size=12):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "dog"]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n_per_class):
            a = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            a[..., c] = 255
            Image.fromarray(a).save(d / f"{i}.png")


@pytest.mark.slow
def test_cifar10_config_on_generated_imagefolder(tmp_path):
    _write_imagefolder(tmp_path / "images")
    cfg = load_config(os.path.join(ROOT, "configs", "cifar10", "l2.yaml"), FAST + [
        "data.kind=imagefolder", f"data.data_dir={tmp_path / 'images'}", "data.resolution=8", "data.image_column=null",
        "data.label_column=null", "model.block_out_channels=[32,32]", "model.norm_num_groups=8",
        "model.layers_per_block=1", "train.batch_size=4", "eval.quality=true",
        f"eval.classifier_cache={tmp_path / 'cls'}"])
    out = run(cfg, str(tmp_path / "run"), max_steps=2, progress=False)
    assert out["step"] == 2 and "quality/classifier_fd" in out


def test_cli_runs_and_reports_config_errors(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "gradscore_train.train"]
    bad = subprocess.run([*train, "--config", "configs/toy/nope.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "configs/toy/nope.yaml" in bad.stderr and "does not exist" in bad.stderr
    bad = subprocess.run([*train, "--config", "configs/toy/l2.yaml", "train.lrr=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.lrr" in bad.stderr
    ok = subprocess.run([*train, "--config", "configs/toy/l2.yaml", "--output-dir", str(tmp_path),
                         "--max-steps", "2", "--no-progress", *FAST, *TOY], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "final metrics" in ok.stdout
    assert os.path.isfile(tmp_path / "checkpoints" / "step-0000002" / "score_model.safetensors")
    assert os.path.isdir(tmp_path / "tensorboard") and os.path.isfile(tmp_path / "metrics.jsonl")


def test_periodic_diagnostics_report_every_error_with_its_stderr():
    """gradscore_train.evaluation.score_diagnostics logs gradient, solenoidal and L2 errors. Oracle
    (docs/theory.md §3, §8): for the exact score plus a zero-effect rotation c J grad log p_t the gradient
    part is ~0 (within 4 stderr) while the solenoidal part carries the L2 error (within 10%; the estimator
    runs at reduced size here)."""
    import gradscore as gs
    from gradscore_train.evaluation import score_diagnostics
    sde, mix = gs.VPSDE(), gs.toy.GaussianMixture.preset("pair")
    rotated = gs.toy.add_zero_effect(mix.score_fn(sde), 2.0)
    out = score_diagnostics(rotated, sde, mix.sample(1024, generator=torch.Generator().manual_seed(0)), [0.3],
                   true_score=mix.score_fn(sde), generator=torch.Generator().manual_seed(1))
    names = ("gradient_error", "solenoidal_error", "l2_error")
    assert set(out) == {f"diag/{n}{s}/t=0.3" for n in names for s in ("", "_stderr")}
    assert abs(out["diag/gradient_error/t=0.3"]) < 4 * out["diag/gradient_error_stderr/t=0.3"]
    assert abs(out["diag/solenoidal_error/t=0.3"] / out["diag/l2_error/t=0.3"] - 1) < 0.1
