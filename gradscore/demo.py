"""A one-minute demonstration on CPU: train a small score model on the ring8 mixture, sample it.

    python -m gradscore.demo [--steps 4000] [--out runs/demo]

Trains ``ScoreModel(TimeMLP)`` (eps-prediction) with ``DSMLoss`` under a VP process, samples with the
probability-flow ODE (Heun) and the reverse SDE (Euler-Maruyama), prints the energy distance of each
to fresh target samples next to the two-sample noise floor and to the exact-score sampler, and saves
a scatter plot to ``<out>/samples.png``.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch

from .metrics import energy_distance
from .nets import TimeMLP
from .objectives import DSMLoss
from .parametrisation import ScoreModel
from .sampling import sample
from .sde import VPSDE
from .toy import GaussianMixture


def train(model, objective, target, steps: int, batch: int, lr: float, generator: torch.Generator):
    """Plain Adam on ``objective(model, x0).mean()`` with a cosine learning-rate decay; returns the loss curve."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0 = target.sample(batch, generator=generator)
        loss = objective(model, x0, generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def plot(path: pathlib.Path, target: torch.Tensor, panels: dict):
    """Scatter of each sample set (panels: title -> [N, 2]) over the target samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(target[:, 0], target[:, 1], s=2, c="lightgray", label="target")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", label="samples")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sample-steps", type=int, default=200, help="sampler steps")
    parser.add_argument("--n", type=int, default=2000, help="samples drawn and compared")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    target = GaussianMixture.preset("ring8")
    sde = VPSDE()
    model = ScoreModel(TimeMLP(2, hidden=128, depth=3), sde, output="eps")
    objective = DSMLoss(sde, weighting="sigma2")

    start = time.perf_counter()
    losses = train(model, objective, target, args.steps, args.batch, lr=3e-3, generator=gen)
    k = max(1, len(losses) // 10)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s; "
          f"DSM loss {sum(losses[:k]) / k:.3f} (first tenth) -> {sum(losses[-k:]) / k:.3f} (last tenth)")

    model.eval()
    ref = target.sample(args.n, generator=gen)
    results = {}
    for method in ("ode", "sde"):
        x = sample(model, sde, (args.n, 2), method=method, steps=args.sample_steps, generator=gen)
        exact = sample(target.score_fn(sde), sde, (args.n, 2), method=method, steps=args.sample_steps, generator=gen)
        results[method] = (x, energy_distance(x, ref), energy_distance(exact, ref))
    floor = energy_distance(target.sample(args.n, generator=gen), ref)

    print(f"energy distance to {args.n} target samples (lower is better; two target samples: {floor:.4f})")
    for method, (_, ed, ed_exact) in results.items():
        print(f"  {method}: model {ed:.4f}   exact score {ed_exact:.4f}")
    path = pathlib.Path(args.out) / "samples.png"
    plot(path, ref, {f"{m.upper()} sampler, model (ED {ed:.4f})": x for m, (x, ed, _) in results.items()})
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    # A 2-D MLP gains nothing from threads, and several threads contend badly on a busy machine
    # (measured: 2000 steps took 12 s on one thread, 247 s on two while other jobs ran).
    torch.set_num_threads(1)
    main()
