"""``python -m gradscore_train.diagnose --config CFG (--checkpoint DIR | --pretrained DIR) [--out OUT]``: per-time
decomposition of a trained model's score error (L2 = gradient + solenoidal) and both KL bounds, and the likelihood
(bits/dim for images, NLL in nats for toys), as JSON and a PNG.
``--pretrained`` takes a diffusers pipeline or UNet folder (``gradscore.load_pretrained``), the data from the config.

The library function behind it is ``gradscore.diagnostics.diagnose``; this module adds what needs the
driver: the config (``gradscore_train.config.load_config``) and the checkpoint
(``gradscore_train.build.load_trained``). For toy data (``data.kind: toy``) the mixture's exact score is
used for the L2 error and its ``log p_T`` for the prior term. Console script: ``gradscore-diagnose-run``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from gradscore.diagnostics import default_times, diagnose

from .build import load_trained, unconditional
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import build_source, toy_mixture


def load_pretrained_for(cfg, path):
    """``(sde, score_model, sample_x0)`` of a diffusers folder, with the data of ``cfg``; the data's shape must be
    the model's input shape."""
    from gradscore import load_pretrained

    model, sde = load_pretrained(path)
    source = build_source(cfg.data)
    c = model.backbone.config
    size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
    if tuple(source.shape) != (c.in_channels, *size):
        raise ConfigError(f"{path}: the model takes [B, {c.in_channels}, {', '.join(map(str, size))}] but the data of "
                          f"{cfg.source or 'the config'} are [B, {', '.join(map(str, source.shape))}]")
    return sde, model, source.sample_x0


def likelihood_metrics(model, sde, cfg, x: torch.Tensor, seed: int) -> dict:
    """``{"bits_per_dim": {...}}`` for images (17 levels for the digits, else 8-bit) or ``{"nll_nats": {...}}`` for
    toys, each ``{"value", "stderr"}`` over the points ``x`` (none when ``x`` is empty)."""
    from gradscore.diagnostics import bits_per_dim, log_likelihood

    if x.shape[0] == 0:
        return {}
    g = torch.Generator(device=x.device).manual_seed(seed)
    if cfg.data.kind == "toy":
        key, v = "nll_nats", -log_likelihood(model, sde, x, generator=g)
    else:
        key, v = "bits_per_dim", bits_per_dim(model, sde, x, levels=17 if cfg.data.kind == "digits" else 256,
                                              generator=g)
    return {key: {"value": float(v.mean()), "stderr": float(v.std() / v.numel() ** 0.5) if v.numel() > 1 else 0.0,
                  "num_data": int(v.numel())}}


def main(argv=None) -> int:
    """Run the CLI; returns 0 (a bad config or checkpoint exits with code 2 and one line naming it)."""
    ap = argparse.ArgumentParser(prog="python -m gradscore_train.diagnose", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML (gradscore_train.config schema)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest)")
    which.add_argument("--pretrained", help="a diffusers pipeline or UNet folder (gradscore.load_pretrained); "
                                             "--config then gives only the data")
    ap.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/diagnostics)")
    ap.add_argument("--num-data", type=int, default=4096, help="data samples x0 drawn from the training source")
    ap.add_argument("--num-times", type=int, default=8, help="points of the time grid")
    ap.add_argument("--num-points", type=int, default=None, help="model evaluations per time (default: the method's)")
    ap.add_argument("--fit-steps", type=int, default=500, help="optimizer steps of each network fitted per time")
    ap.add_argument("--solenoidal-points", type=int, default=None,
                    help="of the points per time, those the solenoidal part is estimated on (default: all; its path "
                         "potential is most of the cost, docs/theory.md §6.6)")
    ap.add_argument("--likelihood-samples", type=int, default=128,
                    help="data points for the likelihood (bits/dim for images, NLL in nats for toys); 0: none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)

    try:                            # bad config or checkpoint: one line naming it, exit code 2
        cfg = load_config(args.config, overrides=tuple(args.overrides))
        if args.pretrained:
            sde, model, sample_x0 = load_pretrained_for(cfg, args.pretrained)
        else:
            sde, model, sample_x0 = load_trained(cfg, args.checkpoint)
            model = unconditional(cfg, model)      # a class-conditional model: its null-label (marginal) score
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        ap.exit(2, f"diagnose: {e}\n")
    torch.manual_seed(args.seed)
    x0 = sample_x0(args.num_data).float()
    true_score = log_prob_T = None
    if cfg.data.kind == "toy":
        mix = toy_mixture(cfg.data)
        true_score = mix.score_fn(sde)
        log_prob_T = lambda x: mix.log_prob(x, sde.T, sde)  # noqa: E731
    out = args.out or os.path.join(args.pretrained or args.checkpoint, "diagnostics")
    options = {"steps": args.fit_steps}
    if args.solenoidal_points is not None:
        if args.solenoidal_points < 1:
            ap.exit(2, f"diagnose: --solenoidal-points must be a positive number of points, got "
                       f"{args.solenoidal_points}\n")
        options["solenoidal_points"] = args.solenoidal_points
    extra = likelihood_metrics(model, sde, cfg, x0[: args.likelihood_samples], args.seed)
    result = diagnose(model, sde, x0, default_times(sde, args.num_times), out, true_score=true_score,
                      log_prob_T=log_prob_T, generator=torch.Generator().manual_seed(args.seed),
                      num_points=args.num_points, options=options, extra=extra)
    print(json.dumps({**result["bounds"], **extra}, indent=2))
    print(f"wrote {out}/diagnostics.json and {out}/diagnostics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
