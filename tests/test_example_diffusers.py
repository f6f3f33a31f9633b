"""examples/train_diffusers.py: a few steps with every objective, the refusal of a launch whose processes did not
join one group, and (slow) two CPU processes ending with identical weights."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from accelerate import Accelerator
from diffusers import DDPMPipeline

import gradscore as gs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_diffusers.py")
FAST = ["--max-steps", "2", "--train-batch-size", "8", "--lr-warmup-steps", "0", "--num-inference-steps", "0"]


def load_example():
    spec = importlib.util.spec_from_file_location("train_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_objective_trains_and_exports(tmp_path, capsys):
    # Each objective runs its recipe (dual_sobolev: critic-only phases, then the joint one) on the UNet2DModel with
    # attention blocks, 2 steps; the exported folder loads with DDPMPipeline and as a gradscore model of the
    # objective's parametrisation, and the weights moved away from their initialisation.
    example = load_example()
    for name in sorted(gs.OBJECTIVES):
        out = tmp_path / name.replace("+", "_")
        example.main(["--objective", name, "--output-dir", str(out), *FAST])
        pipe = DDPMPipeline.from_pretrained(out)
        model, _ = gs.load_pretrained(out)
        expected = gs.EnergyScore if gs.OBJECTIVES[name].parametrisation == "energy" else gs.ScoreModel
        assert isinstance(model, expected), name
        assert pipe.scheduler.config.num_train_timesteps == 1000
    log = capsys.readouterr().out
    assert len(re.findall(r"step 2: \S+ loss -?\d", log)) == len(gs.OBJECTIVES)


def test_refuses_processes_that_train_alone(monkeypatch):
    # accelerate launch --multi_gpu --num_processes 2 on CPU without ACCELERATE_USE_CPU: each process is rank 0 of
    # 1. The launcher's WORLD_SIZE tells; the example must stop, saying what to set.
    example = load_example()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="ACCELERATE_USE_CPU=1"):
        example.check_processes(Accelerator(cpu=True))
    monkeypatch.setenv("WORLD_SIZE", "1")
    example.check_processes(Accelerator(cpu=True))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["energy", "l2+dual_sobolev"])
def test_two_cpu_processes_end_with_identical_weights(objective, tmp_path, free_port):
    # Oracle: DDP broadcasts the initial weights and all-reduces every gradient (score model and critic), so both
    # ranks apply the same updates: their weights and EMA must be bitwise equal (sha256 of the float32 bytes),
    # and 2 ranks must be seen (ACCELERATE_USE_CPU=1 joins them in one gloo group).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), SCRIPT, "--objective", objective,
           "--output-dir", str(tmp_path / "out"), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    ranks = dict(re.findall(r"rank (\d)/2: (weights [0-9a-f]{16} ema [0-9a-f]{16})", proc.stdout))
    assert sorted(ranks) == ["0", "1"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ranks["0"] == ranks["1"]
    assert (tmp_path / "out" / "model_index.json").is_file()
