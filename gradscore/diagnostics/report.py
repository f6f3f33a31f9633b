"""One call that writes the per-time decomposition and both KL bounds as JSON and a PNG."""
from __future__ import annotations

import json
import os

import torch

from ..sde import SDE
from .kl import default_times, kl_bounds

__all__ = ["diagnose"]


def diagnose(score_fn, sde: SDE, x0: torch.Tensor, times=None, out_dir: str = ".", true_score=None,
             log_prob_T=None, generator: torch.Generator | None = None, num_points: int | None = None,
             method: str | None = None, options: dict | None = None, extra: dict | None = None, **cond) -> dict:
    """Decompose the score error on a time grid (``||e||^2 = ||Pi_G e||^2 + ||Pi_S e||^2``) and bound the KL.

    The solenoidal part is its own noise-free estimate (``decompose``), never ``l2 - gradient``. ``method``,
    ``num_points``, ``options`` and ``cond`` are those of ``decompose``; ``extra`` (e.g. ``{"bits_per_dim": ...}``)
    is stored in the JSON as it is. Writes ``out_dir/diagnostics.json`` and ``out_dir/diagnostics.png``
    (per-time L2, gradient and solenoidal parts on a log scale; both bounds in the title). Returns the JSON
    content as a dict.
    """
    times = default_times(sde) if times is None else torch.as_tensor(times, dtype=torch.float64).flatten()
    generator = generator or torch.Generator(device=x0.device).manual_seed(0)
    kl = kl_bounds(score_fn, sde, x0, times, true_score=true_score, log_prob_T=log_prob_T, method=method,
                   num_points=num_points, generator=generator, options=options, **cond)
    rows = []
    for tk, g, so, el in zip(kl["times"], kl["gradient_error"], kl["solenoidal_error"], kl["l2_error"]):
        rows.append({"t": tk, "gradient": g.value, "gradient_stderr": g.stderr,
                     "gradient_lower_bound": g.extra.get("lower_bound"),
                     "l2": el.value, "l2_stderr": el.stderr, "l2_exact": bool(el.extra.get("exact", False)),
                     "solenoidal": so.value, "solenoidal_stderr": so.stderr})
    result = {
        "sde": sde.config(), "num_data": int(x0.shape[0]), "per_time": rows,
        "bounds": {k: kl[k].to_dict() for k in ("girsanov", "gradient", "prior")},
        "integrands": {k: kl[k] for k in ("times", "integrand_girsanov", "integrand_gradient",
                                          "integrand_girsanov_stderr", "integrand_gradient_stderr")},
        **(extra or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "diagnostics.json"), "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, os.path.join(out_dir, "diagnostics.png"))
    return result


def _plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in result["per_time"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    parts = (("l2", "L2 ||e||^2"), ("gradient", "gradient ||Pi_G e||^2"), ("solenoidal", "solenoidal ||Pi_S e||^2"))
    for key, label in parts:
        v = [r[key] if r[key] > 0 else float("nan") for r in result["per_time"]]   # log scale: <= 0 not drawn
        ax.plot(t, v, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("squared error under p_t")
    b = result["bounds"]
    ax.set_title(f"KL bounds: Girsanov {b['girsanov']['value']:.3g}, gradient {b['gradient']['value']:.3g} "
                 f"(prior {b['prior']['value']:.2g})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
