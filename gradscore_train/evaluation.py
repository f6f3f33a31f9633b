"""What a run evaluates besides its loss: samples (plots), score diagnostics and sample quality.

All functions take a plain (unwrapped, eval-mode) score model ``(x [B, *D], t [B]) -> score``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from einops import rearrange

from gradscore.sampling import sample

__all__ = ["draw_samples", "save_scatter", "image_grid", "save_grid", "score_diagnostics", "quality", "to_pixels",
           "likelihood", "likelihood_levels", "range_check"]

log = logging.getLogger(__name__)


def draw_samples(score_model, sde, shape, n: int, method: str, steps: int, seed: int, device, chunk: int = 2000,
                 labels: torch.Tensor | None = None, null_label: int | None = None, guidance_scale: float = 0.0):
    """``n`` samples ``[n, *shape]`` (on CPU) by the reverse SDE / probability-flow ODE; a class-conditional
    model gets ``labels: [n]`` (``class_labels``), guided by ``guidance_scale`` against ``null_label``."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, n, chunk):
        b = min(chunk, n - i)
        cond = {}
        if labels is not None:
            y = labels[i:i + b].to(device)
            cond = {"class_labels": y}
            if guidance_scale != 0:
                cond.update(guidance_scale=guidance_scale, null_cond={"class_labels": torch.full_like(y, null_label)})
        out.append(sample(score_model, sde, (b, *shape), method=method, steps=steps, generator=g, device=device,
                          **cond).cpu())
    return torch.cat(out)


def to_pixels(source, samples: torch.Tensor) -> torch.Tensor:
    """Samples as the data's pixels: latents decoded by the source's autoencoder (``LatentSource``), else as is."""
    return source.decode(samples) if getattr(source, "latent", False) else samples


def save_scatter(samples: torch.Tensor, data: torch.Tensor, path: str, title: str = ""):
    """Scatter plot of the first two coordinates of ``samples`` over ``data`` (both ``[N, d]``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    d, s = data.reshape(data.shape[0], -1), samples.reshape(samples.shape[0], -1)
    ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
    ok = torch.isfinite(s).all(1)
    ax.scatter(s[ok, 0], s[ok, 1], s=2, alpha=0.5, c="tab:blue", label="samples")
    lim = float(d[:, :2].abs().max()) * 1.3 + 0.1
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """The first ``nrow * nrow`` of ``images: [N, C, H, W]`` (values in ``[-1, 1]``) as one grid image
    ``[C, rows * (H + 1) + 1, nrow * (W + 1) + 1]`` in ``[0, 1]``, row by row: every image in a cell
    framed by 1-pixel white lines, empty cells white, NaN pixels black."""
    x = ((images[: nrow * nrow].float().clamp(-1, 1) + 1) / 2).nan_to_num(0.0)
    rows = -(-x.shape[0] // nrow)
    x = torch.cat([x, x.new_ones(rows * nrow - x.shape[0], *x.shape[1:])])     # fill the last row
    cells = F.pad(x, (0, 1, 0, 1), value=1.0)                                # a line right of and below each image
    grid = rearrange(cells, "(row col) c h w -> c (row h) (col w)", col=nrow)
    return F.pad(grid, (1, 0, 1, 0), value=1.0)                              # the frame's top and left lines


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, min_width: int = 256):
    """Save ``images: [N, C, H, W]`` in ``[-1, 1]`` as one PNG grid (``image_grid``), its pixels repeated (nearest
    neighbour, an integer factor) until the grid is at least ``min_width`` pixels wide: 8x8 digits stay visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow)
    scale = max(1, -(-min_width // grid.shape[-1]))
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    img = grid[0] if grid.shape[0] == 1 else rearrange(grid, "c h w -> h w c")
    plt.imsave(path, img.numpy(), cmap="gray" if grid.shape[0] == 1 else None, vmin=0, vmax=1)


def score_diagnostics(score_model, sde, x0: torch.Tensor, times, true_score=None, generator=None,
                      num_points: int = 2**14, fit_steps: int = 200, solenoidal_points: int | None = None) -> dict:
    """Gradient, solenoidal and L2 errors at each ``t`` in ``times`` from one ``gradscore.diagnostics.decompose``
    per time (L2 exact for toys, with the exact score; else gradient + solenoidal), as metrics
    ``diag/<name>/t=<t>`` and ``diag/<name>_stderr/t=<t>``. A diagnostic that fails raises a ``RuntimeError``
    naming the time and the function (a missing number is worse than a stopped evaluation; the config's
    ``eval.diag_times: []`` runs none). ``fit_steps``: optimizer steps of each network the decomposition fits;
    ``solenoidal_points``: of ``num_points``, those the solenoidal part is estimated on (None: all)."""
    from gradscore import diagnostics as D
    out = {}
    for t in map(float, times):
        try:
            parts = D.decompose(score_model, sde, x0, t, num_points=num_points, generator=generator,
                                options={"steps": fit_steps} if solenoidal_points is None
                                else {"steps": fit_steps, "solenoidal_points": solenoidal_points})
            if true_score is not None:
                parts["l2"] = D.l2_error(score_model, sde, x0, t, true_score=true_score, num_points=num_points,
                                         generator=generator)
        except Exception as e:
            raise RuntimeError(f"diagnostic gradscore.diagnostics.decompose at t={t:g} failed: "
                               f"{type(e).__name__}: {e}") from e
        for name, key in (("gradient_error", "gradient"), ("solenoidal_error", "solenoidal"), ("l2_error", "l2")):
            out[f"diag/{name}/t={t:g}"] = parts[key].value
            out[f"diag/{name}_stderr/t={t:g}"] = parts[key].stderr
    return out


def quality(source, samples: torch.Tensor, eval_cfg, seed: int, device="cpu",
            labels: torch.Tensor | None = None) -> dict:
    """Sample-quality metrics: exact NLL and distances for toys; for images with labels, the classifier Frechet
    distance, the classes the samples depict (``class_accuracy`` per class when the samples were drawn for
    ``labels: [N]``, ``class_coverage`` otherwise) and Inception FID when ``eval.fid_weights`` is set."""
    from gradscore import quality as Q

    g = torch.Generator().manual_seed(seed)
    if hasattr(source, "decode"):                    # latents: judged as the decoded images against the images
        samples, source = source.decode(samples), source.pixels
    if hasattr(source, "mixture"):
        return {f"quality/{k}": v for k, v in Q.toy_quality(source.mixture, samples, generator=g).items()}
    out = {}
    n = min(samples.shape[0], len(source))
    real = source.sample_x0(n, generator=g)
    if source.labels is not None:
        net = Q.feature_net(source.key(), source.images, source.labels, eval_cfg.classifier_cache)
        out["quality/classifier_fd"] = Q.classifier_frechet_distance(net, real, samples)
        out["quality/classifier_fd_floor"] = Q.classifier_frechet_distance(net, real, source.sample_x0(n, generator=g))
        if labels is not None:
            out.update({f"quality/class_{k}": v for k, v in Q.class_accuracy(net, samples, labels).items()})
        else:
            classes = int(source.labels.max()) + 1
            out.update({f"quality/class_{k}": v for k, v in Q.class_coverage(net, samples, classes).items()})
    else:
        log.info("data set has no labels: no classifier Frechet distance")
    if eval_cfg.fid_weights:
        try:
            out["quality/fid"] = Q.inception_fid(real, samples, eval_cfg.fid_weights, device=device)
        except (ImportError, FileNotFoundError) as e:
            log.warning("FID skipped: %s", e)
    return out


def likelihood_levels(source) -> int:
    """Quantisation levels of an image source's data: 17 for scikit-learn's digits (0..16), else 256 (8-bit)."""
    return 17 if getattr(source, "name", None) == "digits" else 256


def likelihood(score_model, sde, source, eval_cfg, seed: int, device="cpu") -> dict:
    """The model's likelihood of ``eval.likelihood_samples`` data points by the probability-flow ODE
    (``gradscore.diagnostics.log_likelihood``): for toys the NLL in nats, ``quality/model_nll`` (next to
    ``quality/model_nll_target``, the exact target's ``-log p_t_min`` at the same points: what the exact score
    gives); for images ``quality/bits_per_dim`` with uniform dequantisation (``likelihood_levels``), each with its
    ``_stderr`` over the points. A failure (data off the quantisation grid, a non-finite score) is logged and
    skipped: it must not kill a training run."""
    from gradscore.diagnostics import bits_per_dim, log_likelihood

    g = torch.Generator().manual_seed(seed)
    x = source.sample_x0(eval_cfg.likelihood_samples, generator=g).to(device)
    g_dev = torch.Generator(device=device).manual_seed(seed)
    n = x.shape[0]
    try:
        if hasattr(source, "mixture"):
            nll = -log_likelihood(score_model, sde, x, generator=g_dev)
            target = -source.mixture.log_prob(x.double(), sde.t_min, sde)
            return {"quality/model_nll": float(nll.mean()), "quality/model_nll_stderr": float(nll.std() / n**0.5),
                    "quality/model_nll_target": float(target.mean())}
        bpd = bits_per_dim(score_model, sde, x, levels=likelihood_levels(source), generator=g_dev)
        return {"quality/bits_per_dim": float(bpd.mean()), "quality/bits_per_dim_stderr": float(bpd.std() / n**0.5)}
    except (ValueError, FloatingPointError, RuntimeError) as e:
        log.warning("likelihood skipped: %s: %s", type(e).__name__, e)
        return {}


def range_check(samples: torch.Tensor, data: torch.Tensor, name: str = "samples") -> dict:
    """How far ``samples: [N, *D]`` stray outside the range ``[lo, hi]`` of ``data: [M, *D]``: metrics
    ``eval/outside_range`` (the fraction of samples with a coordinate outside ``[lo - w, hi + w]``,
    ``w = hi - lo``: the data's range widened by its own width on each side), ``eval/max_abs`` (the
    largest finite ``|x|``) and ``eval/nonfinite`` (the fraction holding NaN/Inf). Logs a warning
    naming the numbers when any sample is outside or non-finite."""
    lo, hi = float(data.min()), float(data.max())
    w = hi - lo
    flat = samples.reshape(samples.shape[0], -1).float()
    finite = torch.isfinite(flat).all(1)
    outside = ((flat < lo - w) | (flat > hi + w)).any(1) & finite
    max_abs = float(flat[finite].abs().max()) if finite.any() else float("nan")
    out = {"eval/outside_range": float(outside.float().mean()), "eval/max_abs": max_abs,
           "eval/nonfinite": float((~finite).float().mean())}
    if outside.any() or not finite.all():
        log.warning("%s far outside the data's range: %d of %d beyond [%.3g, %.3g] (data in [%.3g, %.3g]), "
                    "max |x| = %.3g, %d non-finite", name, int(outside.sum()), flat.shape[0], lo - w, hi + w, lo, hi,
                    max_abs, int((~finite).sum()))
    return out
