"""Every registered objective gives the same gradients on two processes (accelerate, gloo, CPU,
DDP with accelerate's defaults) as on one process over the full batch (docs/engineering.md, "Double
backward": double backward under DDP is only exact when gradients are taken inside the module's forward).

Tolerance 1e-6 absolute (measured: <= 6e-8): float32 rounding of a mean over 2 x 8 samples reduced in a different order
(gradients here are of order 1e-1 to 1e1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradscore as gs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("mp_objectives_script.py")



@pytest.mark.slow
def test_two_process_gradients_equal_one_process(tmp_path, free_port):
    out = tmp_path / "report.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    for rank_report in report["ranks"]:
        assert set(rank_report) == set(gs.OBJECTIVES)
        for name, diff in rank_report.items():
            assert diff < 1e-6, f"{name}: DDP gradient differs from the single-process one by {diff}"
