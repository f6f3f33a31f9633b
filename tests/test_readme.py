"""The README's code blocks for swapping the objective and for the diagnostics run as written (with
their size variables made small), so the documented commands cannot rot. The plain loop block is run
by test_sampling.py."""
import pathlib
import re

import torch

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(heading: str) -> str:
    parts = README.split(f"## {heading}", 1)
    assert len(parts) == 2, f"README.md lost its {heading!r} section"
    match = re.search(r"```python\n(.*?)```", parts[1].split("\n## ", 1)[0], re.S)
    assert match, f"no ```python block in the README's {heading!r} section"
    return match.group(1)


def _shrink(code: str, **values) -> str:
    for name, value in values.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert n == 1, f"the README block must define {name} on its own line"
    return code


def test_swap_the_objective_block_trains_and_samples():
    code = _shrink(_block("Swap the objective"), train_steps=5)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert torch.isfinite(ns["samples"]).all()
    assert ns["objective"].name == "l2+dual_sobolev" and ns["objective"].critic is ns["critic"]


def test_diagnostics_block_runs_and_separates_the_parts():
    """Oracle: for a pure zero-effect rotation the gradient part is ~0 while the L2 error is large
    (THEORY 3); the gradient-only bound is below Girsanov's."""
    code = _shrink(_block("Diagnostics"), **{"num_data, num_times": "1024, 3"})
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    sde, x0, rotated, exact = ns["sde"], ns["x0"], ns["rotated"], ns["exact"]
    from gradscore.diagnostics import gradient_error, l2_error
    l2 = l2_error(rotated, sde, x0, 0.3, true_score=exact).value
    grad = gradient_error(rotated, sde, x0, 0.3).value
    assert l2 > 30 and abs(grad) < 0.05 * l2
    assert ns["bounds"]["gradient"].value <= ns["bounds"]["girsanov"].value
