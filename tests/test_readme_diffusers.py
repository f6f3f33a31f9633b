"""The README's "diffusers" section: its sampling block runs as written (fewer samples), and its diff from the plain
eps loss has at most 5 added lines, which are the example's own."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTION = (ROOT / "README.md").read_text().split("\n## diffusers\n", 1)[1].split("\n## ", 1)[0]


def test_scheduler_block_runs():
    code = re.findall(r"```python\n(.*?)```", SECTION, re.S)[0]
    code, n = re.subn(r"^num_samples = .*$", "num_samples = 100", code, flags=re.M)
    assert n == 1
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert torch.isfinite(ns["x"]).all() and ns["x"].shape == (100, 2)


def test_diff_from_the_eps_loss_is_five_lines_of_the_example():
    diff = re.findall(r"```diff\n(.*?)```", SECTION, re.S)[0].splitlines()
    added = [line[1:].strip() for line in diff if line.startswith("+")]
    assert len(added) <= 5
    script = (ROOT / "examples" / "train_diffusers.py").read_text()
    example = [line.split("  #")[0].strip() for line in script.splitlines()]
    # the example builds the objective with critic=critic (None without one) and calls phase.loss (the objective
    # itself when its recipe is one phase); every other added line is in the example as written
    for line in added:
        if line.startswith(("objective = ", "loss = ")):
            continue
        assert line in example, line
    assert "objective = gs.build_objective(args.objective, sde, critic=critic)" in example
    assert "loss = phase.loss(score_fn, clean_images).mean()" in example
