"""Experiment configs: YAML files validated against a typed schema before any compute.

``load_config(path, overrides=())`` reads a YAML file, applies ``key=value`` overrides with dotted
keys (``train.lr=1e-3``; values parsed as YAML, then typed like the file), and returns a
``Config``. Any problem (missing file, unknown key, wrong type, bad choice) raises one
``ConfigError`` naming the key, the file and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

__all__ = ["ConfigError", "Config", "SDEConfig", "DataConfig", "ModelConfig", "CriticConfig", "ObjectiveConfig",
           "TrainConfig", "EvalConfig", "load_config", "config_from_dict", "config_to_dict", "apply_overrides"]


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class SDEConfig:
    type: Literal["vp", "ve"] = "vp"
    beta_min: float = 0.1           # vp
    beta_max: float = 20.0          # vp
    sigma_min: float = 0.01         # ve
    sigma_max: float = 50.0         # ve
    t_min: Optional[float] = None   # None: the process's default


@dataclass
class DataConfig:
    kind: Literal["toy", "digits", "imagefolder", "hf"] = "toy"
    # toy: a named 2-D preset (ring8, grid9, pair, anisotropic) or "random" (a mixture in `dim` dimensions)
    preset: str = "ring8"
    dim: int = 2
    components: int = 8
    spread: float = 2.0             # random mixture: means ~ spread * N(0, I) / sqrt(dim)
    component_std: float = 0.2      # random mixture: isotropic component standard deviation
    mixture_seed: int = 0
    # images
    data_dir: Optional[str] = None  # imagefolder root (or data_dir passed to load_dataset for kind=hf)
    name: Optional[str] = None      # kind=hf: a datasets name found in the local cache (never downloaded in tests)
    split: str = "train"
    image_column: Optional[str] = None   # None: the first Image column ("image", "img")
    label_column: Optional[str] = None   # None: "label"/"labels" if present
    resolution: Optional[int] = None     # None: the data's own size (digits: 8)
    channels: Optional[int] = None       # None: the data's own (1 grey, 3 RGB)
    max_images: Optional[int] = None
    random_flip: bool = False


@dataclass
class ModelConfig:
    kind: Literal["mlp", "unet"] = "mlp"
    hidden: int = 128               # mlp
    depth: int = 3                  # mlp
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])   # unet
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False         # unet: a mid-block attention (double-backward runs it on the math kernel)
    output: Literal["eps", "score", "x0"] = "eps"                 # score parametrisation
    energy: Literal["inner", "norm", "residual", "scalar"] = "inner"   # energy parametrisation


@dataclass
class CriticConfig:
    """The critic's backbone (objectives with ``needs_critic``): a scalar per sample."""
    hidden: int = 128
    depth: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    lr: Optional[float] = None      # None: train.lr


@dataclass
class ObjectiveConfig:
    name: str = "l2"
    hparams: dict = field(default_factory=dict)   # checked against OBJECTIVES[name].defaults when built


@dataclass
class TrainConfig:
    batch_size: int = 256           # global batch (all processes, all accumulation micro-batches)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 2000
    clip_grad: Optional[float] = 1.0
    ema_decay: float = 0.999
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"   # auto: bf16 on a GPU that has it, else no
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10


@dataclass
class EvalConfig:
    sample_every: int = 0           # 0: only at the end
    diagnose_every: int = 0         # 0: only at the end
    num_samples: int = 1000         # samples for plots and quality metrics
    sample_steps: int = 200
    method: Literal["sde", "ode"] = "sde"
    use_ema: bool = True
    diag_times: list[float] = field(default_factory=lambda: [0.05, 0.2, 0.5])
    diag_samples: int = 512
    quality: bool = True            # sample-quality metrics at the end
    classifier_cache: str = "~/.cache/gradscore/classifiers"
    fid_weights: Optional[str] = None   # path to Inception weights (FID through torchmetrics), optional


@dataclass
class Config:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: Optional[str] = None    # the file it was loaded from (informational)


# ----------------------------------------------------------------------------- typed conversion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(tp, str(tp))


def _convert(value, tp, key: str, where: str):
    """``value`` typed as ``tp`` or a ``ConfigError`` naming ``key``."""
    def fail():
        raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, where)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in typing.get_args(tp):
            value = "yes" if value else "no"          # YAML 1.1 reads a bare no/yes as a boolean
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return _build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    raise TypeError(f"unsupported schema type {tp}")


def _build(cls, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; expected one of {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key, where)
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "<config>") -> Config:
    """A validated ``Config`` from a nested mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, data, "", where)
    _check_values(cfg, where)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _check_values(cfg: Config, where: str):
    """Range checks that types cannot express."""
    t = cfg.train
    positive = {"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.max_steps": t.max_steps,
                "train.keep_checkpoints": t.keep_checkpoints, "train.log_every": t.log_every,
                "eval.num_samples": cfg.eval.num_samples, "eval.sample_steps": cfg.eval.sample_steps,
                "eval.diag_samples": cfg.eval.diag_samples, "data.dim": cfg.data.dim, "data.components": cfg.data.components}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{where}: {key} must be >= 1, got {v}")
    nonneg = {"train.warmup_steps": t.warmup_steps, "train.checkpoint_every": t.checkpoint_every,
              "eval.sample_every": cfg.eval.sample_every, "eval.diagnose_every": cfg.eval.diagnose_every,
              "train.weight_decay": t.weight_decay}
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{where}: {key} must be >= 0, got {v}")
    if not t.lr > 0:
        raise ConfigError(f"{where}: train.lr must be > 0, got {t.lr}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.clip_grad is not None and not t.clip_grad > 0:
        raise ConfigError(f"{where}: train.clip_grad must be > 0 or null, got {t.clip_grad}")
    for i, s in enumerate(cfg.eval.diag_times):
        if not 0 < s <= 1:
            raise ConfigError(f"{where}: eval.diag_times[{i}] must be in (0, 1], got {s}")
    d = cfg.data
    if d.kind == "imagefolder" and not d.data_dir:
        raise ConfigError(f"{where}: data.data_dir is required for data.kind='imagefolder'")
    if d.kind == "hf" and not (d.name or d.data_dir):
        raise ConfigError(f"{where}: data.name (a datasets name) is required for data.kind='hf'")
    if d.data_dir and d.kind in ("imagefolder",) and not os.path.isdir(os.path.expanduser(d.data_dir)):
        raise ConfigError(f"{where}: data.data_dir {d.data_dir!r} is not a directory")
    if d.kind != "toy" and cfg.model.kind == "mlp":
        raise ConfigError(f"{where}: model.kind='mlp' needs toy data; use model.kind='unet' for data.kind={d.kind!r}")
    if d.kind == "toy" and cfg.model.kind == "unet":
        raise ConfigError(f"{where}: model.kind='unet' needs image data; use model.kind='mlp' for data.kind='toy'")


# ----------------------------------------------------------------------------- overrides
def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return key, value


def _yaml_number(value):
    """YAML 1.1 reads ``1e-3`` as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides, where: str = "<overrides>") -> dict:
    """Set dotted keys (``train.lr=1e-3``) in a nested mapping (validation happens on build)."""
    data = {} if data is None else dict(data)
    for item in overrides:
        key, value = _parse_override(item)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def _numbers_in(data, cls, prefix=""):
    """Coerce YAML-1.1 strings like '1e-3' where the schema expects a number."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp = hints.get(k)
        if tp is None:
            out[k] = v
            continue
        if dataclasses.is_dataclass(tp):
            out[k] = _numbers_in(v, tp)
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if float in args:
            v = _yaml_number(v)
        elif typing.get_origin(tp) is list and typing.get_args(tp)[0] is float and isinstance(v, list):
            v = [_yaml_number(x) for x in v]
        out[k] = v
    return out


def load_config(path, overrides=()) -> Config:
    """Read, override and validate a YAML config; raises ``ConfigError`` before any compute."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (expected a YAML file, e.g. configs/toy/l2.yaml)")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data or {}, overrides)
    data.setdefault("source", path)
    cfg = config_from_dict(_numbers_in(data, Config), where=path if not overrides else f"{path} (with overrides)")
    return cfg
