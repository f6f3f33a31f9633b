"""Evaluation that fits the run (issue 15, item 6): the time budget's arithmetic, the range check of
samples, and a digits run whose default end-of-run evaluation (1000 samples x 200 steps, diagnostics
at three times on 16384 points) would take ~15 minutes on this machine but is fitted to its budget."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from gradscore_train.budget import EvalBudget, fit_points, fit_samples
from gradscore_train.config import load_config
from gradscore_train.evaluation import range_check
from gradscore_train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fit_samples_and_points_exact():
    # oracle: predicted cost n * steps * cost, largest n (then steps) within the seconds, floors respected
    assert fit_samples(1000, 200, cost=1e-3, seconds=1000.0) == (1000, 200)          # fits as configured
    assert fit_samples(1000, 200, cost=1e-3, seconds=20.0) == (100, 200)             # 100 * 200 * 1e-3 = 20
    assert fit_samples(1000, 200, cost=1e-3, seconds=2.0) == (64, 31)                # 64 samples: 2 / 0.064 = 31.25
    assert fit_samples(1000, 200, cost=1e-3, seconds=0.1) == (64, 20)                # the floors
    assert fit_samples(10, 50, cost=1.0, seconds=100.0) == (10, 20)   # n < floor: 10 steps fit, floor 20
    assert fit_points(65536, calls=6, cost=1e-3, seconds=60.0) == 10000              # 60 / (6 * 1e-3)
    assert fit_points(65536, calls=6, cost=1e-6, seconds=60.0) == 65536
    assert fit_points(65536, calls=6, cost=1.0, seconds=1.0) == 128
    b = EvalBudget.after_training(100.0, 0.25, 30.0)
    assert b.seconds == 30.0                                                       # max(25, 30)
    assert EvalBudget.after_training(1000.0, 0.25, 30.0).seconds == 250.0
    assert not EvalBudget.after_training(1000.0, None, 30.0).limited


def test_range_check_warns_and_reports(caplog):
    data = torch.rand(100, 1, 4, 4) * 2 - 1                       # images in [-1, 1]: far outside means beyond +-3
    ok = data[:50] * 0.9
    assert range_check(ok, data) == {"eval/outside_range": 0.0, "eval/max_abs": pytest.approx(float(ok.abs().max())),
                                     "eval/nonfinite": 0.0}
    bad = ok.clone()
    bad[:10] *= 600 / float(bad[:10].abs().max())                 # 10 of 50 samples reach +-600
    bad[10, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="gradscore_train.evaluation"):
        out = range_check(bad, data)
    assert out["eval/outside_range"] == pytest.approx(10 / 50) and out["eval/nonfinite"] == pytest.approx(1 / 50)
    assert out["eval/max_abs"] == pytest.approx(600.0)
    assert any("far outside the data's range: 10 of 50" in r.message and "1 non-finite" in r.message
               for r in caplog.records)


@pytest.mark.slow
def test_default_evaluation_fits_its_budget_on_digits(tmp_path, caplog, capfd):
    """Default eval sizes, a 3-step digits run, budget max(0.25 x training, 10 s). Oracle: the evaluation
    takes at most 2 x its budget (slack for the pilots, the size floors and a machine whose load changes)
    and says what it does."""
    cfg = load_config(os.path.join(ROOT, "configs", "digits", "l2.yaml"),
                      ["train.batch_size=16", "model.block_out_channels=[16,32]", "train.checkpoint_every=0",
                       "eval.sample_every=0", "eval.quality=false", "eval.min_seconds=10", "train.warmup_steps=0"])
    assert (cfg.eval.num_samples, cfg.eval.sample_steps, cfg.eval.diag_points) == (1000, 200, 16384)
    with caplog.at_level(logging.INFO, logger="gradscore_train.loop"):
        out = run(cfg, str(tmp_path), max_steps=3, progress=True)
    assert out["eval/budget_seconds"] == 10.0
    assert out["eval/seconds"] <= 2 * out["eval/budget_seconds"], out
    assert out["eval/num_samples"] * out["eval/sample_steps"] < 1000 * 200 and out["eval/diag_points"] < 16384
    assert any("instead of 1000 x 200" in r.message for r in caplog.records)
    assert any("diagnostics on" in r.message and "instead of 16384" in r.message for r in caplog.records)
    err = capfd.readouterr().err
    assert "eval step 3: sampling" in err and "diagnostics at 3 times" in err
    assert {"eval/outside_range", "eval/max_abs", "eval/nonfinite"} <= set(out)
