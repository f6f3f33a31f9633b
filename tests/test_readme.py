"""The README's code blocks for swapping the objective and for the diagnostics run as written (with
their size variables made small), so the documented commands cannot rot; the written-out recipe loop
computes what ``gs.train_step`` does. The plain loop block is run by test_sampling.py."""
import pathlib
import re

import torch

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(heading: str) -> list[str]:
    parts = README.split(f"## {heading}", 1)
    assert len(parts) == 2, f"README.md lost its {heading!r} section"
    blocks = re.findall(r"```python\n(.*?)```", parts[1].split("\n## ", 1)[0], re.S)
    assert blocks, f"no ```python block in the README's {heading!r} section"
    return blocks


def _block(heading: str) -> str:
    return _blocks(heading)[0]


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


def test_written_out_recipe_is_train_step():
    """The second block of "Swap the objective" (the loop over ``objective.phases()``) computes what
    ``gs.train_step`` does: bitwise the same weights after one step of ``dual_sobolev`` (four critic-only
    phases, then the joint one) from the same weights and global random state (same operations in the
    same order, so tolerance 0)."""
    import copy

    import gradscore as gs

    blocks = _blocks("Swap the objective")
    assert len(blocks) >= 2 and "objective.phases()" in blocks[1], "the written-out recipe loop is missing"
    sde = gs.VPSDE()
    torch.manual_seed(0)
    model = gs.ScoreModel(gs.TimeMLP(2, hidden=16, depth=2), sde)
    critic = gs.Critic(gs.TimeMLP(2, hidden=16, depth=2, out_dim=1), sde)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    ends = []
    for written_out in (False, True):
        m, c = copy.deepcopy(model), copy.deepcopy(critic)
        objective = gs.build_objective("dual_sobolev", sde, critic=c)
        opt = torch.optim.Adam([*m.parameters(), *c.parameters()], lr=1e-2)
        torch.manual_seed(2)
        if written_out:
            exec(compile(blocks[1], "README.md", "exec"), {"objective": objective, "model": m, "x0": x0, "opt": opt})
        else:
            gs.train_step(objective, m, x0, opt)
        ends.append(torch.cat([p.detach().flatten() for p in [*m.parameters(), *c.parameters()]]))
    assert not torch.equal(ends[0], torch.cat([p.flatten() for p in [*model.parameters(), *critic.parameters()]]))
    assert torch.equal(ends[0], ends[1])


def test_diagnostics_block_runs_and_separates_the_parts():
    """Oracle: for a pure zero-effect rotation the gradient part is ~0 while the L2 error is large
    (docs/theory.md §3); the gradient-only bound is below Girsanov's."""
    code = _shrink(_block("Diagnostics"), **{"num_data, num_times": "1024, 3"})
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    sde, x0, rotated, exact = ns["sde"], ns["x0"], ns["rotated"], ns["exact"]
    from gradscore.diagnostics import gradient_error, l2_error
    l2 = l2_error(rotated, sde, x0, 0.3, true_score=exact).value
    grad = gradient_error(rotated, sde, x0, 0.3).value
    assert l2 > 30 and abs(grad) < 0.05 * l2
    assert ns["bounds"]["gradient"].value <= ns["bounds"]["girsanov"].value
