"""Step 2 of an ablation: train every run of the grid under one budget, resumably.

A run with ``final_metrics.json`` is skipped, an interrupted run resumes from its latest checkpoint, a
run that failed (NaN) is retried next time; each training segment is appended to the run's
``ablation_log.json`` (status, start step, wall time). ``launcher.kind``: ``inprocess`` (default: one
run after another in this process), ``subprocess`` (``parallel`` runs at once, each in a fresh
``python -m gradscore_train.ablate CONFIG --run-one ID``) or ``accelerate`` (``accelerate launch
--multi_gpu --num_processes N -m gradscore_train.ablate CONFIG --run-one ID``, one run after another).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from ..checkpoint import latest_intact_checkpoint, read_step
from .config import Ablation, RunSpec, write_json

__all__ = ["train_one", "train_all", "launch_command", "final_metrics_path", "segments"]


def final_metrics_path(spec: RunSpec) -> str:
    """``run_dir/final_metrics.json``: written last by a run, so its presence means the run finished."""
    return os.path.join(spec.run_dir, "final_metrics.json")


def segments(spec: RunSpec) -> list[dict]:
    """The training segments recorded in ``run_dir/ablation_log.json`` (``[]`` before the first)."""
    path = os.path.join(spec.run_dir, "ablation_log.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _record(spec: RunSpec, entry: dict):
    """Append a training segment (wall time, steps, status) to ``run_dir/ablation_log.json``."""
    write_json(os.path.join(spec.run_dir, "ablation_log.json"), segments(spec) + [entry])


def train_one(spec: RunSpec, progress: bool = False) -> str:
    """Train ``spec`` in this process (every rank under accelerate). Returns ``"skipped"``,
    ``"resumed"``, ``"trained"`` or ``"failed"`` (a ``NonFiniteLoss``, recorded; retried next time)."""
    from accelerate import PartialState

    from ..loop import NonFiniteLoss, run

    if os.path.isfile(final_metrics_path(spec)):
        return "skipped"
    ckpt = latest_intact_checkpoint(spec.run_dir)
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


def launch_command(ab: Ablation, spec: RunSpec) -> list[str]:
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
    # the folder holding gradscore_train/, so the child imports this copy even when it is not installed
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return env


def train_all(ab: Ablation, progress: bool = True) -> dict:
    """Train every unfinished run of the grid; returns ``{run_id: status}``. With ``budget.wall_time`` the pilot
    (``wall_time.measure_step_costs``) first times the objectives, once, to size the equal-wall-time arm."""
    if ab.schema.budget.wall_time is not None and not os.path.isfile(ab.step_costs_path):
        from .wall_time import measure_step_costs
        measure_step_costs(ab, progress=progress)
        ab.refresh()
    todo = [r for r in ab.runs() if not os.path.isfile(final_metrics_path(r))]
    status = {r.run_id: "skipped" for r in ab.runs() if os.path.isfile(final_metrics_path(r))}
    lc = ab.schema.launcher
    if todo and progress:
        print(f"[ablate] training {len(todo)} of {len(ab.runs())} runs ({lc.kind}"
              f"{', parallel ' + str(lc.parallel) if lc.kind == 'subprocess' else ''}"
              f"{', ' + str(lc.num_processes) + ' processes' if lc.kind == 'accelerate' else ''})", flush=True)
    if lc.kind == "inprocess":
        threads = torch.get_num_threads()
        if lc.threads:
            torch.set_num_threads(lc.threads)
        try:
            for i, spec in enumerate(todo):
                t0 = time.perf_counter()
                status[spec.run_id] = train_one(spec)
                if progress:
                    print(f"[ablate] {i + 1}/{len(todo)} {spec.run_id}: {status[spec.run_id]} "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
        finally:                  # launcher.threads is the runs' setting; the assessment afterwards uses every core
            torch.set_num_threads(threads)
        return status
    width = lc.parallel if lc.kind == "subprocess" else 1
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < width:
            spec = pending.pop(0)
            os.makedirs(spec.run_dir, exist_ok=True)
            logf = open(os.path.join(spec.run_dir, "train.log"), "a")
            proc = subprocess.Popen(launch_command(ab, spec), stdout=logf, stderr=subprocess.STDOUT, env=_env(ab))
            running.append((spec, proc, logf, time.perf_counter(), len(segments(spec))))
        time.sleep(0.2)
        for item in list(running):
            spec, proc, logf, t0, before = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            ok = proc.returncode == 0 and os.path.isfile(final_metrics_path(spec))
            new = segments(spec)[before:]
            if ok:
                status[spec.run_id] = "trained"
            elif new and new[-1]["status"] == "failed":     # train_one recorded a NonFiniteLoss: a result, not a crash
                status[spec.run_id] = f"failed (non-finite loss, see {spec.run_dir}/ablation_log.json)"
            else:
                status[spec.run_id] = f"failed (exit {proc.returncode}, see {spec.run_dir}/train.log)"
            if progress:
                print(f"[ablate] {spec.run_id}: {status[spec.run_id]} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return status
