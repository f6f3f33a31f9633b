"""Controlled comparison of objectives and the correlation study: one command, one report.

    python -m gradscore_train.ablate configs/ablations/toy.yaml [--skip-study] [--runs-only] [--report-only]

1. trains the grid ``objectives x seeds x grid`` of ``train/ablation_config.py`` under one budget.
   Resumable: a run with ``final_metrics.json`` is skipped, an interrupted run resumes from its latest
   checkpoint, a run that failed (NaN) is retried next time. ``launcher.kind``: ``inprocess`` (default),
   ``subprocess`` (``parallel`` runs at once) or ``accelerate`` (``accelerate launch --multi_gpu
   --num_processes N``, one run after another);
2. assesses every model with the same seeds (``train/assess.py``): final checkpoints for the comparison,
   plus intermediate checkpoints and perturbed exact scores (``train/population.py``) for the study;
   assessments are cached as JSON next to what they assess;
3. writes ``<output_dir>/report.md`` and its PNGs (``train/report_md.py``) and prints the table.

Internal: ``--run-one RUN_ID`` trains one run (what the subprocess / accelerate launchers call).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch

from .ablation.config import Ablation, RunSpec, load_ablation
from .checkpoint import checkpoint_dirs, latest_checkpoint, read_step
from .config import ConfigError

__all__ = ["train_one", "train_all", "assess_all", "main"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- training
def _final(spec: RunSpec) -> str:
    return os.path.join(spec.run_dir, "final_metrics.json")


def _record(spec: RunSpec, entry: dict):
    """Append a training segment (wall time, steps, status) to ``run_dir/ablation_log.json``."""
    path = os.path.join(spec.run_dir, "ablation_log.json")
    segments = []
    if os.path.isfile(path):
        with open(path) as f:
            segments = json.load(f)
    segments.append(entry)
    os.makedirs(spec.run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(segments, f, indent=1)


def train_one(spec: RunSpec, progress: bool = False) -> str:
    """Train ``spec`` in this process (every rank under accelerate). Returns ``"skipped"``,
    ``"resumed"``, ``"trained"`` or ``"failed"`` (a ``NonFiniteLoss``, recorded; retried next time)."""
    from accelerate import PartialState

    from .loop import NonFiniteLoss, run

    if os.path.isfile(_final(spec)):
        return "skipped"
    ckpt = latest_checkpoint(spec.run_dir)
    start = read_step(ckpt) if ckpt else 0
    t0 = time.perf_counter()
    status = "resumed" if ckpt else "trained"
    error = None
    try:
        run(spec.config, spec.run_dir, resume="latest" if ckpt else None, progress=progress)
    except NonFiniteLoss as e:
        status, error = "failed", str(e)
    if PartialState().is_main_process:
        _record(spec, {"status": status, "start_step": start, "wall_s": time.perf_counter() - t0, "error": error,
                       "num_processes": PartialState().num_processes})
    return status


def _launch_command(ab: Ablation, spec: RunSpec) -> list[str]:
    lc = ab.schema.launcher
    module = ["-m", "gradscore_train.ablate", os.path.abspath(ab.path), "--run-one", spec.run_id]
    if lc.kind == "accelerate":
        exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
        exe = exe if os.path.isfile(exe) else "accelerate"
        return [exe, "launch", "--multi_gpu", "--num_processes", str(lc.num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *lc.extra_args, *module]
    return [sys.executable, *module]


def _env(ab: Ablation) -> dict:
    env = dict(os.environ)
    if ab.schema.launcher.threads:
        env["OMP_NUM_THREADS"] = str(ab.schema.launcher.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return env


def train_all(ab: Ablation, progress: bool = True) -> dict:
    """Train every unfinished run of the grid; returns ``{run_id: status}``."""
    todo = [r for r in ab.runs() if not os.path.isfile(_final(r))]
    status = {r.run_id: "skipped" for r in ab.runs() if os.path.isfile(_final(r))}
    lc = ab.schema.launcher
    if todo and progress:
        print(f"[ablate] training {len(todo)} of {len(ab.runs())} runs ({lc.kind}"
              f"{', parallel ' + str(lc.parallel) if lc.kind == 'subprocess' else ''}"
              f"{', ' + str(lc.num_processes) + ' processes' if lc.kind == 'accelerate' else ''})", flush=True)
    if lc.kind == "inprocess":
        if lc.threads:
            torch.set_num_threads(lc.threads)
        for i, spec in enumerate(todo):
            t0 = time.perf_counter()
            status[spec.run_id] = train_one(spec)
            if progress:
                print(f"[ablate] {i + 1}/{len(todo)} {spec.run_id}: {status[spec.run_id]} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
        return status
    width = lc.parallel if lc.kind == "subprocess" else 1
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < width:
            spec = pending.pop(0)
            os.makedirs(spec.run_dir, exist_ok=True)
            logf = open(os.path.join(spec.run_dir, "train.log"), "a")
            proc = subprocess.Popen(_launch_command(ab, spec), stdout=logf, stderr=subprocess.STDOUT, env=_env(ab))
            running.append((spec, proc, logf, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            spec, proc, logf, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            ok = proc.returncode == 0 and os.path.isfile(_final(spec))
            status[spec.run_id] = "trained" if ok else f"failed (exit {proc.returncode}, see {spec.run_dir}/train.log)"
            if progress:
                print(f"[ablate] {spec.run_id}: {status[spec.run_id]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return status


# ----------------------------------------------------------------------------- assessment
def _cached(path: str, compute):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


def _eval_key(ev) -> str:
    """Assessments are cached per evaluation setting: changing a size re-assesses."""
    import hashlib
    from dataclasses import asdict
    return hashlib.sha1(json.dumps(asdict(ev), sort_keys=True).encode()).hexdigest()[:8]


def _run_info(spec: RunSpec) -> dict:
    info = {"run_id": spec.run_id, "label": spec.label, "objective": spec.objective, "seed": spec.seed}
    if os.path.isfile(_final(spec)):
        with open(_final(spec)) as f:
            info["final_metrics"] = json.load(f)
    logp, segs = os.path.join(spec.run_dir, "ablation_log.json"), []
    if os.path.isfile(logp):
        with open(logp) as f:
            segs = json.load(f)
    info["wall_s"] = sum(s["wall_s"] for s in segs if s["status"] != "failed") if segs else None
    info["failed"] = next((s["error"] for s in reversed(segs) if s["status"] == "failed"), None) \
        if not os.path.isfile(_final(spec)) else None
    return info


def assess_all(ab: Ablation, progress: bool = True) -> dict:
    """Assess every finished run (final checkpoint, and the kept intermediate ones when the study wants
    them) and the perturbed exact scores. Returns ``{"runs": [...], "population": [...]}``."""
    from .ablation.assessment import assess
    from .build import load_trained
    from .data import toy_mixture
    from .ablation.population import perturbed_scores

    ev, st = ab.schema.evaluate, ab.schema.study
    key = _eval_key(ev)
    runs, population = [], []
    t0 = time.perf_counter()
    toy = all(r.config.data.kind == "toy" for r in ab.runs())
    for spec in ab.runs():
        info = _run_info(spec)
        runs.append(info)
        if "final_metrics" not in info or not toy:
            continue
        mixture = toy_mixture(spec.config.data)
        ckpts = checkpoint_dirs(spec.run_dir)
        final_step = spec.config.train.max_steps
        for ck in ckpts:
            step = read_step(ck)
            if step != final_step and not (st.enabled and st.intermediate_checkpoints):
                continue
            path = os.path.join(spec.run_dir, "assessment", f"{os.path.basename(ck)}-{key}.json")

            def compute(ck=ck, step=step, mixture=mixture):
                sde, model, _ = load_trained(spec.config, ck)
                samples = os.path.join(spec.run_dir, "assessment", f"samples-{os.path.basename(ck)}-{key}.pt")
                os.makedirs(os.path.dirname(samples), exist_ok=True)
                return assess(model, sde, mixture, ev, samples_path=samples if step == final_step else None)

            result = _cached(path, compute)
            result.update({"name": f"{spec.run_id} @ {step}", "family": "trained", "step": step})
            if step == final_step:
                info["assessment"] = result
                info["samples_path"] = os.path.join(spec.run_dir, "assessment", f"samples-{os.path.basename(ck)}-{key}.pt")
            if st.enabled:
                population.append(result)
    if st.enabled and toy and ab.runs():
        spec0 = ab.runs()[0]
        from .build import build_sde
        sde, mixture = build_sde(spec0.config), toy_mixture(spec0.config.data)
        for p in perturbed_scores(mixture.score_fn(sde), st.rotations, st.gradient_errors, st.combinations):
            safe = p.name.replace(" ", "_").replace("=", "").replace("+", "and")
            result = _cached(os.path.join(ab.output_dir, "study", f"{safe}-{key}.json"),
                             lambda p=p: assess(p.score_fn, sde, mixture, ev))
            result.update({"name": p.name, "family": p.family, "a": p.a, "c": p.c})
            population.append(result)
    if progress:
        print(f"[ablate] assessed {len(population) or len(runs)} models in {time.perf_counter() - t0:.1f}s", flush=True)
    return {"runs": runs, "population": population}


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradscore_train.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="ablation YAML, e.g. configs/ablations/toy.yaml")
    p.add_argument("--run-one", default=None, metavar="RUN_ID", help=argparse.SUPPRESS)
    p.add_argument("--runs-only", action="store_true", help="train the grid, no assessment or report")
    p.add_argument("--skip-study", action="store_true", help="no correlation study (study.enabled=false)")
    p.add_argument("--report-only", action="store_true", help="assess and report what has finished; train nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ab = load_ablation(args.config, {"study": {"enabled": False}} if args.skip_study else None)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if ab.schema.launcher.threads and args.run_one is None:
        torch.set_num_threads(ab.schema.launcher.threads)
    if args.run_one is not None:
        if ab.schema.launcher.threads:
            torch.set_num_threads(ab.schema.launcher.threads)
        status = train_one(ab.run(args.run_one))
        return 3 if status == "failed" else 0
    t0 = time.perf_counter()
    print(f"[ablate] {ab.schema.name}: {len(ab.runs())} runs ({len(ab.schema.objectives)} objectives x "
          f"{len(ab.schema.seeds)} seeds{' x grid' if ab.schema.grid else ''}) -> {ab.output_dir}", flush=True)
    if not args.report_only:
        train_all(ab)
    if args.runs_only:
        return 0
    results = assess_all(ab)
    from .ablation.report import write_report
    path, table = write_report(ab, results, wall_s=time.perf_counter() - t0)
    print(table)
    print(f"[ablate] report: {path}  ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
