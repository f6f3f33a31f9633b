"""From a ``Config`` to the objects of a run: process, data, score model, critic, objective.

``load_trained(config, checkpoint_dir) -> (sde, score_model, sample_x0)`` rebuilds a trained
score model from a checkpoint (EMA weights when ``config.eval.use_ema`` and saved), for the
diagnostics CLI and notebooks.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import gradscore
from gradscore import EDMSDE, OBJECTIVES, VESDE, VPSDE, Critic, EnergyScore, ScoreModel, TimeMLP
from gradscore.objectives import ObjectiveSpec
from gradscore.sde import SDE

from .config import Config, ConfigError
from .data import build_source

__all__ = ["objective_spec", "build_sde", "build_backbone", "build_score_model", "build_critic",
           "objective_from_config", "check_objective_config", "load_trained", "null_labels", "unconditional",
           "check_labels"]


def objective_spec(name: str) -> ObjectiveSpec:
    """``gradscore.OBJECTIVES[name]``, or a config error listing the known objectives."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name={name!r} is not a known objective; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_objective_config(cfg: Config) -> ObjectiveSpec:
    """The objective's registry entry, after checking ``objective.hparams`` with the library's own
    validation (``OBJECTIVES[name].validate``: names, types, values) and the model against the
    parametrisation. Raises ``ConfigError`` naming the config file and the key."""
    spec = objective_spec(cfg.objective.name)
    where = cfg.source or "config"
    hparams = cfg.objective.hparams
    try:
        spec.validate(hparams)
    except ValueError as e:
        unknown = [k for k in hparams if k not in spec.defaults]
        if unknown:     # named by its config key (validate() lists the names without the key path)
            raise ConfigError(f"{where}: objective.hparams.{unknown[0]} is not a hyperparameter of {spec.name!r}; "
                              f"expected one of {sorted(spec.defaults) or '(none)'}") from None
        raise ConfigError(f"{where}: objective.hparams: {e}") from None
    if spec.parametrisation == "energy" and cfg.model.kind == "unet" and cfg.model.energy == "scalar":
        raise ConfigError(f"{where}: model.energy='scalar' needs a backbone returning [B]; "
                          "with model.kind='unet' use inner, norm or residual")
    return spec


def build_sde(cfg: Config) -> SDE:
    s = cfg.sde
    if s.type == "vp":
        sde = VPSDE(s.beta_min, s.beta_max) if s.t_min is None else VPSDE(s.beta_min, s.beta_max, t_min=s.t_min)
    elif s.type == "edm":
        extra = {} if s.t_min is None else {"t_min": s.t_min}
        sde = EDMSDE(s.sigma_min, s.sigma_max, sigma_data=s.sigma_data, P_mean=s.P_mean, P_std=s.P_std, **extra)
    else:
        sde = VESDE(s.sigma_min, s.sigma_max) if s.t_min is None else VESDE(s.sigma_min, s.sigma_max, t_min=s.t_min)
    return sde


def _unet(shape, m, out_channels=None, num_classes: int = 0):
    from diffusers import UNet2DModel

    C, H, W = shape
    if H != W:
        raise ConfigError(f"model.kind='unet' needs square images, got {H}x{W}; set data.resolution")
    n = len(m.block_out_channels)
    if H % (2 ** (n - 1)):
        raise ConfigError(f"images of size {H} cannot be halved {n - 1} times "
                          f"(model.block_out_channels={m.block_out_channels})")
    for c in m.block_out_channels:
        if c % m.norm_num_groups:
            raise ConfigError(f"every model.block_out_channels must be divisible by "
                              f"norm_num_groups={m.norm_num_groups}, got {c}")
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=out_channels or C,
                       block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                       down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
                       norm_num_groups=m.norm_num_groups, add_attention=m.attention,
                       num_class_embeds=num_classes + 1 if num_classes else None)     # the last label is the null one


def build_backbone(cfg: Config, shape, scalar: bool = False) -> nn.Module:
    m = cfg.model
    if m.kind == "mlp":
        if len(shape) != 1:
            raise ConfigError(f"model.kind='mlp' needs vectors [B, d], data has shape {shape}")
        return TimeMLP(shape[0], hidden=m.hidden, depth=m.depth, out_dim=1 if scalar else None)
    return _unet(shape, m, num_classes=m.num_classes)


def build_score_model(cfg: Config, sde: SDE, shape, spec) -> nn.Module:
    if spec.parametrisation == "energy":
        backbone = build_backbone(cfg, shape, scalar=cfg.model.energy == "scalar")
        return EnergyScore(backbone, sde, energy=cfg.model.energy)
    if spec.parametrisation != "score":
        raise ConfigError(f"objective {spec.name!r} has parametrisation {spec.parametrisation!r}; "
                          "expected 'score' or 'energy'")
    return ScoreModel(build_backbone(cfg, shape), sde, output=cfg.model.output)


def build_critic(cfg: Config, sde: SDE, shape) -> nn.Module:
    c = cfg.critic
    if len(shape) == 1:
        backbone = TimeMLP(shape[0], hidden=c.hidden, depth=c.depth, out_dim=1)
    else:
        m = type(cfg.model)(kind="unet", block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                            norm_num_groups=c.norm_num_groups, attention=False)
        # psi~ = <x, f(x, t | y)> / 2, the image critic; it sees the labels the score model sees
        return Critic(_unet(shape, m, num_classes=cfg.model.num_classes), sde, potential="inner")
    return Critic(backbone, sde)


def check_labels(cfg: Config, source) -> None:
    """A class-conditional model (``model.num_classes > 0``) needs labels in ``0..num_classes - 1``; raises
    ``ConfigError`` naming the data set, its label range and the key."""
    k = cfg.model.num_classes
    if k == 0:
        return
    labels = getattr(source, "labels", None)
    name = getattr(source, "name", cfg.data.kind)
    if labels is None:
        raise ConfigError(f"{cfg.source or 'config'}: model.num_classes={k} needs labelled data, but {name} has no "
                          "labels (for an imagefolder or datasets set, set data.label_column)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise ConfigError(f"{cfg.source or 'config'}: the labels of {name} lie in [{lo}, {hi}], outside "
                          f"0..model.num_classes - 1 = {k - 1}; set model.num_classes={hi + 1}")


def null_labels(cfg: Config, n: int, device=None) -> dict:
    """The null condition of a class-conditional model, ``{"class_labels": [n] filled with num_classes}``
    (the label condition dropout trains), or ``{}`` for an unconditional one."""
    if cfg.model.num_classes == 0:
        return {}
    return {"class_labels": torch.full((n,), cfg.model.num_classes, dtype=torch.long, device=device)}


def unconditional(cfg: Config, model):
    """``(x, t) -> score``: the model itself, or for a class-conditional one its null-label score (the
    marginal score it learns through condition dropout), so diagnostics see a plain score callable."""
    if cfg.model.num_classes == 0:
        return model
    return lambda x, t: model(x, t, **null_labels(cfg, x.shape[0], x.device))


def objective_from_config(cfg: Config, sde: SDE, critic=None):
    """The objective instance ``objective(model, x0) -> [B]`` named by ``cfg.objective`` (through the
    library's ``gradscore.build_objective``)."""
    return gradscore.build_objective(cfg.objective.name, sde, critic=critic, **cfg.objective.hparams)


def _load_weights(model: nn.Module, ckpt: str, use_ema: bool) -> str:
    from .checkpoint import read_safetensors

    path = os.path.join(ckpt, "score_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt!r} has no score_model.safetensors")
    try:
        model.load_state_dict(read_safetensors(path))
    except RuntimeError as e:          # missing or unexpected keys, size mismatches: not the config's model
        detail, own = " ".join(str(e).split())[:300], os.path.join(ckpt, "config.yaml")
        raise ConfigError(f"{path} does not fit the model the config builds (was it trained with another config or "
                          f"overrides? its own config is {own}): {detail}") from None
    ema_path = os.path.join(ckpt, "ema.safetensors")
    if use_ema and os.path.isfile(ema_path):
        shadow = read_safetensors(ema_path)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(shadow[k].to(p.dtype))
        return "ema"
    return "raw"


def load_trained(config: Config, checkpoint_dir: str, device=None, use_ema: bool | None = None):
    """``(sde, score_model, sample_x0)`` from a checkpoint folder (or a run folder: its latest).

    ``score_model(x [B, *D], t [B]) -> score`` is in eval mode on ``device``; ``sample_x0(n)``
    draws ``n`` training examples ``[n, *D]`` (fresh mixture samples for toys). The checkpoint is
    verified (``CheckpointError`` naming a damaged file) and its ``config.yaml`` must agree with
    ``config`` outside ``train``, ``eval`` and ``critic`` (``ConfigError`` listing the keys)."""
    from .checkpoint import resolve_checkpoint, verify_checkpoint
    from .config import check_same_experiment, config_to_dict, read_yaml

    ckpt = resolve_checkpoint(checkpoint_dir)
    verify_checkpoint(ckpt)
    spec = check_objective_config(config)
    sde = build_sde(config)
    source = build_source(config.data)
    model = build_score_model(config, sde, source.shape, spec)
    _load_weights(model, ckpt, config.eval.use_ema if use_ema is None else use_ema)
    saved = os.path.join(ckpt, "config.yaml")
    if os.path.isfile(saved):       # weights of the same shapes may still belong to another process or objective
        check_same_experiment(read_yaml(saved, what="checkpoint config"), config_to_dict(config), saved,
                              ignored=("train.", "eval.", "critic."),
                              hint="Pass the config the checkpoint was trained with (its config.yaml)")
    model.eval().to(device or "cpu")
    return sde, model, source.sample_x0

