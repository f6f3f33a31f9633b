"""The ablation runner (gradscore_train.ablate and gradscore_train.ablation): validation, skip / resume,
launchers, and the report on a tiny grid (2 objectives x 2 seeds, a few steps, tiny diagnostics).

Resume oracle: the training loop reseeds every step from (seed, step), so a run interrupted after its
first checkpoint and resumed by the runner must end with exactly the weights of the uninterrupted run
(max abs difference 0: same ops in the same order on one thread).
"""
import glob
import json
import math
import os
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gradscore_train.ablate import main
from gradscore_train.ablation.assessment import assess_all
from gradscore_train.ablation.config import is_reference, load_ablation
from gradscore_train.ablation.report import write_report
from gradscore_train.ablation.runs import launch_command, train_all
from gradscore_train.config import ConfigError

TINY = {
    "name": "tiny",
    "base": "configs/toy/l2.yaml",
    "objectives": {"l2": {}, "energy": {}},
    "seeds": [0, 1],
    "overrides": {"train.max_steps": 6, "train.checkpoint_every": 3, "train.batch_size": 64, "model.hidden": 16,
                  "model.depth": 2, "eval.num_samples": 20, "eval.sample_steps": 5, "eval.diag_times": []},
    "launcher": {"kind": "inprocess", "threads": 1},
    "assessment": {"num_samples": 100, "sample_steps": 20, "num_data": 32, "num_points": 256, "num_times": 3,
                 "num_features": 8, "siem_particles": 50, "siem_steps": 20},
    "study": {"rotations": [2.0], "gradient_errors": [0.5], "combinations": [[0.5, 2.0]], "bootstrap": 50},
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, **changes):
    data = json.loads(json.dumps(TINY))
    data["base"] = os.path.join(ROOT, TINY["base"])
    data["output_dir"] = str(tmp_path / "out")
    data.update(changes)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("change, named", [
    ({"objectivs": ["l2"]}, "objectivs"),
    ({"launcher": {"kind": "inprocess", "paralel": 2}}, "launcher.paralel"),
    ({"assessment": {"num_samplez": 3}}, "assessment.num_samplez"),
    ({"assessment": {"solenoidal_points": 0}}, "assessment.solenoidal_points"),
    ({"objectives": {"l3": {}}}, "l3"),
    ({"objectives": {"l2": {"weightin": "sigma2"}}}, "weightin"),
    ({"overrides": {"train.max_stepz": 3}}, "train.max_stepz"),
    ({"launcher": {"kind": "slurm"}}, "launcher.kind"),
    ({"seeds": []}, "seeds"),
    ({"budget": {"wall_time": "dual_sobolev"}}, "budget.wall_time"),
    ({"budget": {"wall_time": "l2", "pilot_stepz": 2}}, "budget.pilot_stepz"),
])
def test_unknown_or_bad_keys_raise_one_error_naming_them(tmp_path, change, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_ablation(_write(tmp_path, **change))


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    assert main([_write(tmp_path, objectivs=["l2"])]) == 2
    assert "objectivs" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "ablations", "*.yaml"))))
def test_every_shipped_ablation_config_loads(path):
    """Every grid of configs/ablations/ builds all its runs' training configs, and a wall-time reference names runs
    of the grid (load_ablation raises a ConfigError naming the key otherwise)."""
    ab = load_ablation(path)
    ref = ab.schema.budget.wall_time
    assert ab.runs("steps") and (ref is None or any(is_reference(r.label, ref) for r in ab.runs("steps")))


@pytest.mark.parametrize("name", ["toy", "digits", "digits_cond", "cifar10"])
def test_shipped_ablation_configs_validate(name):
    ab = load_ablation(os.path.join(ROOT, "configs", "ablations", f"{name}.yaml"))
    objectives = {r.objective for r in ab.runs()}
    assert objectives == {"l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry"}
    assert len({r.seed for r in ab.runs()}) >= 3
    # matched budget: everything but the objective section is identical across the equal-steps runs of one seed
    for seed in ab.schema.seeds:
        cfgs = [r.config for r in ab.runs("steps") if r.seed == seed]
        for c in cfgs[1:]:
            for section in ("train", "model", "data", "sde", "eval"):
                assert getattr(c, section) == getattr(cfgs[0], section), section


def test_digits_comparison_config_asks_for_both_budgets():
    """configs/ablations/digits.yaml (issue 13): every objective, l2+dual_sobolev at l2_weight 0.1 / 0.3 / 1.0, 3 seeds,
    equal steps and equal wall time against energy, every model assessed by the image assessment."""
    ab = load_ablation(os.path.join(ROOT, "configs", "ablations", "digits.yaml"))
    labels = {r.label for r in ab.runs("steps")}
    assert labels == {"l2", "energy", "dual_sobolev", "asymmetry", *(f"l2+dual_sobolev/l2_weight={w}"
                                                                    for w in (0.1, 0.3, 1.0))}
    assert len(ab.runs("steps")) == 21 and ab.schema.budget.wall_time == "energy"
    assert ab.schema.study.quality == "classifier_fd" and not ab.schema.study.enabled


def test_grid_crosses_hyperparameters_with_the_objectives_that_have_them(tmp_path):
    ab = load_ablation(_write(tmp_path, objectives={"l2": {}, "l2+dual_sobolev": {}},
                              grid={"objective.hparams.l2_weight": [0.5, 2.0]}))
    ids = [r.run_id for r in ab.runs()]
    assert ids == ["l2/seed-0", "l2/seed-1",
                   "l2+dual_sobolev/l2_weight=0.5/seed-0", "l2+dual_sobolev/l2_weight=0.5/seed-1",
                   "l2+dual_sobolev/l2_weight=2.0/seed-0", "l2+dual_sobolev/l2_weight=2.0/seed-1"]
    assert ab.run("l2+dual_sobolev/l2_weight=2.0/seed-1").config.objective.hparams == {"l2_weight": 2.0}


# ----------------------------------------------------------------------------- runner + report
def _weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "step-0000006", "score_model.safetensors"))


def test_tiny_grid_skip_resume_and_report(tmp_path, capsys):
    ab = load_ablation(_write(tmp_path))
    assert len(ab.runs()) == 4
    status = train_all(ab, progress=False)
    assert set(status.values()) == {"trained"}
    for r in ab.runs():
        assert os.path.isfile(os.path.join(r.run_dir, "final_metrics.json"))

    # finished runs are skipped: nothing is retrained or rewritten
    mtimes = {r.run_id: os.path.getmtime(os.path.join(r.run_dir, "final_metrics.json")) for r in ab.runs()}
    assert set(train_all(ab, progress=False).values()) == {"skipped"}
    assert mtimes == {r.run_id: os.path.getmtime(os.path.join(r.run_dir, "final_metrics.json")) for r in ab.runs()}

    # an interrupted run (only its step-3 checkpoint left) resumes from it and ends where it would have
    spec = ab.run("energy/seed-1")
    before = _weights(spec.run_dir)
    os.remove(os.path.join(spec.run_dir, "final_metrics.json"))
    shutil.rmtree(os.path.join(spec.run_dir, "checkpoints", "step-0000006"))
    status = train_all(ab, progress=False)
    assert status["energy/seed-1"] == "resumed" and status["l2/seed-0"] == "skipped"
    log = json.load(open(os.path.join(spec.run_dir, "ablation_log.json")))
    assert [s["status"] for s in log] == ["trained", "resumed"] and log[-1]["start_step"] == 3
    after = _weights(spec.run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # assessment and report: every objective and the correlation table, numbers from the results
    results = assess_all(ab, progress=False)
    assert len(results["runs"]) == 4
    families = [p["family"] for p in results["population"]]
    assert families.count("trained") == 8          # 4 runs x (step 3 + step 6)
    assert {"exact", "rotation", "gradient", "combination"} <= set(families)
    path, table = write_report(ab, results)
    text = open(path).read()
    for label in ("| l2 |", "| energy |", "Correlation study", "gradient-only KL bound", "Girsanov KL bound", "SIEM"):
        assert label in text, label
    for png in ("samples.png", "comparison.png", "decomposition.png", "kl_vs_quality.png", "correlation.png"):
        assert os.path.getsize(os.path.join(ab.output_dir, png)) > 1000, png
    ed = [r["assessment"]["quality"]["energy_distance"] for r in results["runs"] if r["objective"] == "l2"]
    from gradscore_train.ablation.report import fmt_mean_std
    assert f"| l2 | 2/2 | {fmt_mean_std(ed)} |" in text
    assert "Spearman" in table

    # assessments are cached: a second pass recomputes nothing and returns the same numbers
    again = assess_all(ab, progress=False)
    assert [p["predictors"] for p in again["population"]] == [p["predictors"] for p in results["population"]]


def test_subprocess_launcher_trains_and_skips(tmp_path):
    path = _write(tmp_path, objectives={"l2": {}}, seeds=[0],
                  launcher={"kind": "subprocess", "parallel": 2, "threads": 1})
    ab = load_ablation(path)
    assert train_all(ab, progress=False) == {"l2/seed-0": "trained"}
    assert train_all(ab, progress=False) == {"l2/seed-0": "skipped"}
    metrics = json.load(open(os.path.join(ab.runs()[0].run_dir, "final_metrics.json")))
    assert metrics["step"] == 6 and metrics["train/seconds_per_step"] > 0


def test_a_crashed_run_fails_the_ablation_a_diverged_one_does_not(tmp_path, monkeypatch, capsys):
    """Subprocess launcher: a run whose process dies without recording a NonFiniteLoss is a crash (status names the
    exit code and train.log; the command exits 4 naming it), one that recorded a NonFiniteLoss (what train_one does
    on NaN/Inf) is a result of the comparison ("non-finite loss"; exit 0)."""
    import sys

    from gradscore_train.ablation import runs

    path = _write(tmp_path, seeds=[0], launcher={"kind": "subprocess", "parallel": 2, "threads": 1})
    record = ("import json, os, sys; f = os.path.join(sys.argv[1], 'ablation_log.json'); "
              "old = json.load(open(f)) if os.path.isfile(f) else []; "
              "json.dump(old + [{'status': 'failed', 'error': 'NaN'}], open(f, 'w')); sys.exit(3)")

    def fake(ab, spec):
        if spec.objective == "l2":
            return [sys.executable, "-c", "raise SystemExit(1)"]
        return [sys.executable, "-c", record, spec.run_dir]

    monkeypatch.setattr(runs, "launch_command", fake)
    status = runs.train_all(load_ablation(path), progress=False)
    assert status["l2/seed-0"].startswith("failed (exit 1, see") and "train.log" in status["l2/seed-0"]
    assert status["energy/seed-0"].startswith("failed (non-finite loss")
    assert main([path, "--runs-only"]) == 4
    err = capsys.readouterr().err
    assert "1 run(s) crashed" in err and "l2/seed-0" in err and "energy/seed-0" not in err
    monkeypatch.setattr(runs, "launch_command", lambda ab, spec: [sys.executable, "-c", record, spec.run_dir])
    assert main([path, "--runs-only"]) == 0


def test_accelerate_launcher_command(tmp_path):
    # the launch itself (2 gloo processes on CPU) was checked by hand; here: the command line it runs
    launcher = {"kind": "accelerate", "num_processes": 3, "extra_args": ["--main_process_port", "0"]}
    ab = load_ablation(_write(tmp_path, launcher=launcher))
    cmd = launch_command(ab, ab.run("l2/seed-0"))
    assert cmd[1:5] == ["launch", "--multi_gpu", "--num_processes", "3"]
    assert cmd[-7:] == ["--main_process_port", "0", "-m", "gradscore_train.ablate", os.path.abspath(ab.path),
                        "--run-one", "l2/seed-0"]


def test_critic_capacity_ablation_varies_only_the_critic():
    """configs/ablations/toy_critic.yaml: the demo's budget crossed with the critic's width; its
    comment's parameter shares (128 = 100%, 56 = 22%, 24 = 5.5% of the score MLP) hold."""
    from gradscore.nets import TimeMLP

    ab = load_ablation(os.path.join(ROOT, "configs", "ablations", "toy_critic.yaml"))
    runs = ab.runs()
    assert {r.objective for r in runs} == {"dual_sobolev", "l2+dual_sobolev"}
    assert sorted({r.config.critic.hidden for r in runs}) == [24, 56, 128]
    for seed in ab.schema.seeds:
        cfgs = [r.config for r in runs if r.seed == seed]
        for c in cfgs[1:]:
            for section in ("train", "model", "data", "sde", "eval"):
                assert getattr(c, section) == getattr(cfgs[0], section), section
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    score = n(TimeMLP(2, 128, 3))
    share = {h: n(TimeMLP(2, h, 3, out_dim=1)) / score for h in (128, 56, 24)}
    assert share[128] == pytest.approx(1.0, abs=0.01)
    assert share[56] == pytest.approx(0.22, abs=0.005) and share[24] == pytest.approx(0.055, abs=0.003)


def test_assessment_keeps_the_prior_term_and_its_stderr_apart():
    """Oracle (docs/theory.md §4): each KL bound is the prior term plus the trapezoid integral of
    ``g(t)^2 / 2`` times the squared error, and the standard errors of independent parts add in
    quadrature. So from the assessment's own per-time L2 errors, ``kl_girsanov - kl_prior`` and
    ``stderr.kl_girsanov^2 - stderr.kl_prior^2`` are determined; they hold to float64 rounding (1e-12
    relative) only if ``kl_prior`` is the prior's value and ``stderr.kl_prior`` its standard error. The
    score: the exact one of a 2-D mixture plus a zero-effect rotation (large L2 error)."""
    import gradscore as gs
    from gradscore.diagnostics import default_times
    from gradscore.diagnostics.kl import trapezoid_weights
    from gradscore_train.ablation.assessment import assess
    from gradscore_train.ablation.config import AssessmentConfig

    sde, mixture = gs.VPSDE(), gs.toy.GaussianMixture.preset("pair")
    ac = AssessmentConfig(**TINY["assessment"])
    out = assess(gs.toy.add_zero_effect(mixture.score_fn(sde), 2.0), sde, mixture, ac)
    times = default_times(sde, ac.num_times)
    w_half_g2 = trapezoid_weights(times) * 0.5 * sde.g2(times).to(torch.float64)
    l2 = torch.tensor([r["l2"] for r in out["per_time"]], dtype=torch.float64)
    l2_se = torch.tensor([r["l2_stderr"] for r in out["per_time"]], dtype=torch.float64)
    integral, integral_var = float((w_half_g2 * l2).sum()), float(((w_half_g2 * l2_se) ** 2).sum())
    assert out["predictors"]["kl_girsanov"] - out["kl_prior"] == pytest.approx(integral, rel=1e-12)
    se = out["stderr"]
    assert se["kl_girsanov"] ** 2 - se["kl_prior"] ** 2 == pytest.approx(integral_var, rel=1e-12)
    assert se["kl_prior"] > 0


def test_image_report_puts_per_class_numbers_in_a_table_of_their_own():
    """summary_rows on two class-conditional image runs (final metrics only, as the loop writes them): the overall
    accuracy is a column of the main table, the per-class accuracies (mean ± std over the seeds) a table below."""
    from gradscore_train.ablation.report import _per_class_table, summary_rows

    fm = [{"quality/class_accuracy": 0.5, "quality/class_accuracy/0": 0.25, "quality/class_accuracy/1": 0.75,
           "train/seconds_per_step": 0.1},
          {"quality/class_accuracy": 0.7, "quality/class_accuracy/0": 0.75, "quality/class_accuracy/1": 0.65,
           "train/seconds_per_step": 0.1}]
    runs = [{"label": "l2", "run_id": f"l2-s{i}", "final_metrics": m, "wall_s": 1.0} for i, m in enumerate(fm)]
    rows = summary_rows(runs, "classifier_fd")
    lines = _per_class_table(rows)
    assert lines[0].startswith("Per-class accuracy")
    assert lines[2].splitlines() == ["| objective | 0 | 1 |", "|---|---|---|", "| l2 | 0.5 ± 0.354 | 0.7 ± 0.0707 |"]
    assert _per_class_table([{"label": "l2", "quality/classifier_fd": "1"}]) == []


def test_digits_study_config_validates():
    """configs/ablations/digits_study.yaml: 3 objectives x 2 seeds x 2 widths (x 3 checkpoints each: 36 models),
    every run under the same budget, the image study's quality and a sane assessment size."""
    ab = load_ablation(os.path.join(ROOT, "configs", "ablations", "digits_study.yaml"))
    assert len(ab.runs()) == 12 and {r.objective for r in ab.runs()} == {"l2", "energy", "l2+dual_sobolev"}
    assert {tuple(r.config.model.block_out_channels) for r in ab.runs()} == {(16, 32), (32, 64)}
    assert {r.config.train.max_steps // r.config.train.checkpoint_every for r in ab.runs()} == {3}
    assert ab.schema.study.quality == "classifier_fd" and ab.schema.assessment.num_data >= 8 * 64
    large = load_ablation(os.path.join(ROOT, "configs", "ablations", "digits_study_large.yaml"))
    assert len(large.runs()) == 45 and large.schema.study.quality == "classifier_fd"
    assert {r.config.train.max_steps // r.config.train.checkpoint_every for r in large.runs()} == {4}


def test_image_study_tiny_grid(tmp_path):
    """The digits study end to end on a tiny grid (2 objectives x 1 seed x 4 steps, a checkpoint at 2 and 4):
    every checkpoint assessed alike (classifier FD with its floor, coverage, the neural diagnostics, both bounds,
    bits/dim, the cost of each), perturbed copies of the first run's model in pixel space, the correlation
    tables (all models, trained alone) and sample grids in the report. The numbers of so small a run mean
    nothing; the test checks that each is there, finite where it must be, and that assessments are cached."""
    cfg = {
        "name": "tiny_digits", "base": os.path.join(ROOT, "configs/digits/l2.yaml"),
        "output_dir": str(tmp_path / "out"),
        "objectives": {"l2": {}, "energy": {}}, "seeds": [0],
        "overrides": {"train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 3,
                      "train.batch_size": 16, "train.warmup_steps": 1, "model.block_out_channels": [16, 32],
                      "critic.block_out_channels": [8, 16], "eval.num_samples": 8, "eval.sample_steps": 2,
                      "eval.diag_times": [], "eval.classifier_cache": str(tmp_path / "cls")},
        # two processes: the runs train in subprocesses and the checkpoints are assessed by two spawned workers
        "launcher": {"kind": "subprocess", "parallel": 2, "threads": 1},
        "assessment": {"num_samples": 64, "sample_steps": 10, "num_data": 512, "num_points": 1024, "num_times": 3,
                       "fit_steps": 5, "solenoidal_points": 512, "likelihood_samples": 4, "likelihood_rtol": 1e-2,
                       "siem_particles": 100, "siem_steps": 50},
        "study": {"quality": "classifier_fd", "rotations": [2.0], "gradient_errors": [0.5], "combinations": [],
                  "bootstrap": 50},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ab = load_ablation(str(path))
    status = train_all(ab, progress=False)
    assert set(status.values()) == {"trained"}, status
    results = assess_all(ab, progress=False)
    pop = results["population"]
    assert [p["family"] for p in pop].count("trained") == 4 and {"rotation", "gradient"} <= {p["family"] for p in pop}
    for p in pop:
        assert math.isfinite(p["quality"]["classifier_fd"]) and p["quality"]["classifier_fd_floor"] >= 0
        assert 0 <= p["quality"]["class_coverage"] <= 1
        for k in ("dsm_l2", "gradient", "solenoidal", "kl_girsanov", "kl_gradient", "siem", "bits_per_dim"):
            assert math.isfinite(p["predictors"][k]), (p["name"], k)
        assert p["predictors"]["kl_gradient"] <= p["predictors"]["kl_girsanov"] + 1e-9
        assert set(p["cost_s"]) == {"quality", "diagnostics", "likelihood", "siem"} and p["cost_s"]["diagnostics"] > 0
    report, console = write_report(ab, results)
    text = open(report).read()
    assert "## Correlation study" in text and "Trained models alone (4" in text and "bits/dim" in text
    assert "Spearman" in console
    for obj in ("l2", "energy"):
        assert f"| {obj} | 1/1 |" in text
        assert os.path.isfile(os.path.join(ab.output_dir, f"samples-{obj}.png"))
    assert os.path.isfile(os.path.join(ab.output_dir, "correlation.png"))
    again = assess_all(ab, progress=False)["population"]
    assert [p["predictors"] for p in again] == [p["predictors"] for p in pop]

    # an assessment cached before SIEM was an image predictor gets it on the next pass, the same number as a fresh one
    cache = sorted(glob.glob(os.path.join(ab.output_dir, "runs", "l2", "seed-0", "assessment", "step-0000004-*.json")))
    old = json.load(open(cache[0]))
    fresh = old["predictors"].pop("siem")
    json.dump(old, open(cache[0], "w"))
    migrated = [p for p in assess_all(ab, progress=False)["population"] if p["name"] == "l2/seed-0 @ 4"][0]
    assert migrated["predictors"]["siem"] == pytest.approx(fresh, rel=1e-12)
    assert json.load(open(cache[0]))["predictors"]["siem"] == migrated["predictors"]["siem"]

    # the controlled comparison without the study (configs/ablations/digits.yaml): the same image assessment of the
    # final models (read from the cache here), no population, no correlation section
    comparison = load_ablation(str(path), {"study": {"enabled": False}})
    res = assess_all(comparison, progress=False)
    assert res["population"] == [] and all("classifier_fd" in r["assessment"]["quality"] for r in res["runs"])
    assert [r["assessment"]["predictors"] for r in res["runs"]] == \
        [p["predictors"] for p in pop if p["family"] == "trained" and p["step"] == 4]
    text = open(write_report(comparison, res)[0]).read()
    assert "classifier FD" in text and "## Correlation study" not in text and "decomposition.png" in text


def test_equal_wall_time_arm_from_a_frozen_pilot(tmp_path):
    """budget.wall_time: a pilot times every objective's optimizer step side by side (the loop's own step), freezes
    the steps in step_costs.json, and each non-reference objective gets a second run of round(N c_ref / c) steps;
    the reference's equal-steps run serves both budgets. The timings themselves are not asserted (no timed tests):
    the steps must follow the frozen costs exactly, the runs must train those steps, resume must skip them, and the
    report must show both tables."""
    from gradscore_train.ablation.wall_time import equal_time_steps

    path = _write(tmp_path, seeds=[0], budget={"wall_time": "energy", "pilot_steps": 2, "pilot_rounds": 2})
    ab = load_ablation(path)
    assert [r.run_id for r in ab.runs()] == ["l2/seed-0", "energy/seed-0"]     # the arm waits for the pilot
    status = train_all(ab, progress=False)
    costs = json.load(open(ab.step_costs_path))
    c = costs["seconds_per_step"]
    assert set(c) == {"l2", "energy"} and len(costs["rounds"]["l2"]) == 2 and costs["reference_steps"] == 6
    n = equal_time_steps(6, c["energy"], c["l2"])
    assert n == max(1, round(6 * c["energy"] / c["l2"])) and costs["steps"] == {"l2": n, "energy": 6}
    ab = load_ablation(path)
    time_runs = ab.runs("wall_time")
    assert [r.run_id for r in time_runs] == [f"l2/max_steps={n}/seed-0"]
    assert time_runs[0].config.train.max_steps == n and time_runs[0].config.objective.name == "l2"
    assert status[time_runs[0].run_id] == "trained"
    assert json.load(open(os.path.join(time_runs[0].run_dir, "final_metrics.json")))["step"] == n
    assert set(train_all(ab, progress=False).values()) == {"skipped"}       # frozen: the same runs again
    report, _ = write_report(ab, assess_all(ab, progress=False))
    text = open(report).read()
    assert "### Equal steps (6 optimizer steps each)" in text and "### Equal wall time" in text
    assert f"| l2/max_steps={n} | 1/1 |" in text
    assert os.path.getsize(os.path.join(ab.output_dir, "comparison.png")) > 1000

    # costs timed for another reference (or step count) are refused by name, not silently reused
    costs["reference"] = "l2"
    json.dump(costs, open(ab.step_costs_path, "w"))
    with pytest.raises(ConfigError, match="step_costs.json.*delete the file"):
        load_ablation(path)


def test_wall_time_reference_with_grid_values(tmp_path):
    """budget.wall_time may name an objective at grid values (dual_sobolev/n_critic=5): that label is the reference,
    the objective's other grid points get a wall-time arm like the other objectives; a grid over critic.* applies
    to the objectives with a critic only (l2 runs once, not once per critic setting). Expansion only, from a
    hand-written step_costs.json (the pilot is covered above)."""
    grid = {"objective.hparams.n_critic": [5, 1], "critic.lr": [0.003, 0.01]}
    path = _write(tmp_path, seeds=[0], objectives={"l2": {}, "dual_sobolev": {}}, grid=grid,
                  budget={"wall_time": "dual_sobolev/n_critic=5/lr=0.003"})
    ab = load_ablation(path)
    labels = [r.label for r in ab.runs("steps")]
    assert labels == ["l2", "dual_sobolev/n_critic=5/lr=0.003", "dual_sobolev/n_critic=5/lr=0.01",
                      "dual_sobolev/n_critic=1/lr=0.003", "dual_sobolev/n_critic=1/lr=0.01"]
    r = ab.run("dual_sobolev/n_critic=1/lr=0.01/seed-0")
    assert r.config.objective.hparams == {"n_critic": 1} and r.config.critic.lr == 0.01
    steps = {label: 6 * (i + 1) for i, label in enumerate(labels)}
    os.makedirs(ab.output_dir)
    json.dump({"reference": "dual_sobolev/n_critic=5/lr=0.003", "reference_steps": 6, "steps": steps,
               "seconds_per_step": {label: 1.0 for label in labels}}, open(ab.step_costs_path, "w"))
    ab = load_ablation(path)
    time_runs = {r.base_label: r.config.train.max_steps for r in ab.runs("wall_time")}
    assert time_runs == {k: v for k, v in steps.items() if k != "dual_sobolev/n_critic=5/lr=0.003"}
    from gradscore_train.ablation.wall_time import _reference_label
    labelled = {r.label: r for r in ab.runs("steps")}
    assert {_reference_label(ab, r, labelled) for r in ab.runs("steps")} == {"dual_sobolev/n_critic=5/lr=0.003"}
    # a reference that matches no run is named with the labels there are
    with pytest.raises(ConfigError, match="n_critic=3.*matches no run"):
        load_ablation(path, {"budget": {"wall_time": "dual_sobolev/n_critic=3"}})


def test_parallel_assessment_equals_the_sequential_one(tmp_path):
    """launcher.parallel > 1 assesses the uncached checkpoints in that many spawned processes of one thread; every
    number must be what the sequential pass (this process, one thread) computes: same seeds, same ops, so equal up
    to 1e-12 (the same float64 arithmetic; exact in practice)."""

    path = _write(tmp_path, seeds=[0], launcher={"kind": "subprocess", "parallel": 2, "threads": 1})
    ab = load_ablation(path)
    assert set(train_all(ab, progress=False).values()) == {"trained"}
    parallel = assess_all(ab, progress=False)
    caches = glob.glob(os.path.join(ab.output_dir, "runs", "*", "seed-0", "assessment", "step-*.json"))
    assert len(caches) == 4                                   # 2 runs x (step 3 + step 6), written by the workers
    for f in caches:
        os.remove(f)
    sequential = assess_all(load_ablation(path, {"launcher": {"kind": "inprocess"}}), progress=False)
    trained = [(p["name"], p["predictors"], p["quality"]) for p in parallel["population"] if p["family"] == "trained"]
    again = [(p["name"], p["predictors"], p["quality"]) for p in sequential["population"] if p["family"] == "trained"]
    assert [t[0] for t in trained] == [t[0] for t in again] and len(trained) == 4
    for (name, pred, q), (_, pred2, q2) in zip(trained, again):
        for k in pred:
            assert pred[k] == pytest.approx(pred2[k], rel=1e-12, abs=1e-12), (name, k)
        assert q["energy_distance"] == pytest.approx(q2["energy_distance"], rel=1e-12), name
