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
                     "solenoidal": so.value, "solenoidal_stderr": so.stderr,
                     # the held-out points each part averages over (neural decomposition: solenoidal_points option)
                     "num_points": g.extra.get("num_points"), "solenoidal_points": so.extra.get("solenoidal_points")})
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
    rows = result["per_time"]
    positive = [r[k] for r in rows for k, _ in parts if r[k] > 0]
    floor = min(positive) / 10 if positive else 1e-12          # the band is clipped there, not at 0 (log scale)
    for key, label in parts:
        v = [r[key] if r[key] > 0 else float("nan") for r in rows]          # log scale: <= 0 drawn as a limit
        se = [r.get(f"{key}_stderr") or 0.0 for r in rows]
        line, = ax.plot(t, v, marker="o", ms=3, label=label)
        lo = [max(r[key] - 2 * e, floor) for r, e in zip(rows, se)]
        hi = [max(r[key] + 2 * e, floor) for r, e in zip(rows, se)]
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        # an estimate <= 0 (a part near 0 within its noise): its upper 2-standard-error limit as a down triangle
        lim = [(tk, r[key] + 2 * e) for tk, r, e in zip(t, rows, se) if r[key] <= 0 < r[key] + 2 * e]
        if lim:
            ax.plot(*zip(*lim), ls="none", marker="v", ms=6, mfc="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("squared error under p_t")
    ax.plot([], [], ls="none", marker="v", mfc="none", color="0.4", label="estimate <= 0: its +2 s.e. limit")
    ax.fill_between([], [], [], color="0.4", alpha=0.15, lw=0, label="+- 2 standard errors")
    b = result["bounds"]
    ax.set_title(f"KL bounds: Girsanov {b['girsanov']['value']:.3g} +- {b['girsanov']['stderr']:.2g}, "
                 f"gradient {b['gradient']['value']:.3g} +- {b['gradient']['stderr']:.2g} "
                 f"(prior {b['prior']['value']:.2g})"
                 + (f"; {result['bits_per_dim']['value']:.3g} bits/dim" if result.get("bits_per_dim") else ""),
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
