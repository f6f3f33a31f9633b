"""Experiment configs: YAML files typed by OmegaConf structured configs and checked before any compute.

``load_config(path, overrides=()) -> Config`` reads a YAML file, merges it over the schema below (the
dataclasses and their defaults), applies ``key=value`` overrides with dotted keys (``train.lr=1e-3``;
the value is parsed as YAML), then range-checks the values. Typing, merging and dotted keys are
OmegaConf's (``OmegaConf.structured``, ``OmegaConf.update``); any problem (missing file, unknown key,
wrong type, bad choice, value out of range) raises one ``ConfigError`` naming the file, the key and
what was expected, e.g. ``configs/toy/l2.yaml (with overrides): train.lr must be a number, got 'fast'``.

Merging: a mapping given for a section (``train: {lr: 1e-3}``) merges into it; any other value,
including a plain mapping field such as ``objective.hparams``, replaces the default. Values are read
with YAML 1.2's rules (only true/false are booleans, so ``mixed_precision: no`` is the string 'no';
``1e-3`` is a number) and converted by OmegaConf (a quoted number in a numeric field becomes the
number, a number in a string field its text).
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = ["ConfigError", "Config", "SDEConfig", "DataConfig", "ModelConfig", "CriticConfig", "ObjectiveConfig",
           "TrainConfig", "EvalConfig", "load_config", "config_from_dict", "config_to_dict", "structured",
           "read_yaml", "parse_override", "config_changes", "check_same_experiment", "check_resume_config",
           "RESUMABLE_CHANGES"]


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class SDEConfig:
    type: Literal["vp", "ve", "edm"] = "vp"
    beta_min: float = 0.1           # vp
    beta_max: float = 20.0          # vp
    sigma_min: float = 0.01         # ve, edm (EDM's own range: 0.002)
    sigma_max: float = 50.0         # ve, edm (EDM's own range: 80)
    sigma_data: float = 0.5         # edm: the data standard deviation (ScoreModel(output="edm"), weighting "edm")
    P_mean: float = -1.2            # edm: training noise levels log sigma ~ N(P_mean, P_std^2)
    P_std: float = 1.2              # edm
    t_min: float | None = None   # None: the process's default


@dataclass
class DataConfig:
    kind: Literal["toy", "digits", "imagefolder", "hf"] = "toy"
    # toy: a named 2-D preset (ring8, grid9, pair, anisotropic) or "random" (a mixture in `dim` dimensions)
    preset: str = "ring8"
    dim: int = 2
    components: int = 8
    # random mixture: means ~ spread * N(0, I), scaled by sqrt(2 / dim) above 2-D (so E|mean|^2 = 2 spread^2)
    spread: float = 2.0
    component_std: float = 0.2      # random mixture: isotropic component standard deviation
    mixture_seed: int = 0
    # images
    data_dir: str | None = None  # imagefolder root (or data_dir passed to load_dataset for kind=hf)
    name: str | None = None      # kind=hf: a datasets name found in the local cache (never downloaded in tests)
    split: str = "train"
    image_column: str | None = None   # None: the first Image column ("image", "img")
    label_column: str | None = None   # None: "label"/"labels" if present
    resolution: int | None = None     # None: the data's own size (digits: 8)
    channels: int | None = None       # None: the data's own (1 grey, 3 RGB)
    max_images: int | None = None
    random_flip: bool = False
    # latent diffusion: a local diffusers AutoencoderKL / AutoencoderTiny folder (or a pipeline folder with vae/); the
    # images are encoded once, cached in latent_cache, and samples decoded (gradscore_train/latents.py)
    autoencoder: str | None = None
    latent_cache: str = "~/.cache/gradscore/latents"
    # images from datasets: true decodes all into memory (every rank), false reads the memory-mapped Arrow files
    # batch by batch (data larger than memory), null: in memory up to 1 GiB of pixels
    in_memory: bool | None = None


@dataclass
class ModelConfig:
    kind: Literal["mlp", "unet"] = "mlp"
    hidden: int = 128               # mlp
    depth: int = 3                  # mlp
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])   # unet
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention: bool = False         # unet: a mid-block attention (double-backward runs it on the math kernel)
    output: Literal["eps", "score", "x0", "v", "edm"] = "eps"      # score parametrisation (edm: needs sde.type=edm)
    energy: Literal["auto", "inner", "norm", "residual", "scalar"] = "inner"   # energy parametrisation
    num_classes: int = 0            # > 0: class-conditional unet (num_class_embeds = num_classes + 1; the last: null)


@dataclass
class CriticConfig:
    """The critic (objectives with ``needs_critic``): its backbone, a scalar per sample, and its own
    optimizer settings. The critic is the other player of the min-max, so its gradients are clipped by
    their own norm and it is decayed only by its own ``weight_decay`` (``train.*`` is the score model's)."""
    hidden: int = 128
    depth: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    lr: float | None = None      # None: train.lr
    clip_grad: float | None = None   # max norm of the critic's own gradients; None: train.clip_grad (.inf: none)
    weight_decay: float = 0.0       # AdamW decay of the critic's parameters only
    betas: list[float] | None = None   # AdamW (beta1, beta2) of the critic only, e.g. [0.5, 0.9]; None: torch's default


@dataclass
class ObjectiveConfig:
    name: str = "l2"
    hparams: dict = field(default_factory=dict)   # checked against OBJECTIVES[name].defaults when built


@dataclass
class TrainConfig:
    batch_size: int = 256           # global batch (all processes, all accumulation micro-batches)
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0       # AdamW decay of the score model's parameters (the critic's: critic.weight_decay)
    warmup_steps: int = 0
    max_steps: int = 2000
    clip_grad: float | None = 1.0   # max norm of the score model's gradients (null: no clipping)
    cond_dropout: float = 0.0       # class-conditional: probability a label becomes the null label (guidance training)
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
    diag_times: list[float] = field(default_factory=lambda: [0.05, 0.2, 0.5])   # []: no score diagnostics
    diag_fit_steps: int = 100       # optimizer steps of each network a score diagnostic fits (per time)
    diag_solenoidal_points: int | None = None   # of diag_points, those of the solenoidal part (None: all)
    diag_samples: int = 512
    diag_points: int = 16384        # points of each diagnostic estimate (gradscore.diagnostics num_points)
    # time budget (gradscore_train/budget.py): an evaluation may take max(budget x the training time since the
    # last one, min_seconds); sizes above are reduced to fit (logged, and in the metrics eval/*). null: exact sizes
    budget: float | None = 0.25
    min_seconds: float = 30.0
    quality: bool = True            # sample-quality metrics at the end
    classifier_cache: str = "~/.cache/gradscore/classifiers"
    fid_weights: str | None = None   # path to Inception weights (FID through torchmetrics), optional
    guidance_scale: float = 0.0     # class-conditional samples: classifier-free guidance w (0: conditional score)
    likelihood: bool = False        # at the end: bits/dim of data (images) or model NLL in nats (toys), PF-ODE
    likelihood_samples: int = 256   # data points the likelihood averages over


@dataclass
class Config:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str | None = None    # the file it was loaded from (informational)


# ----------------------------------------------------------------------------- reading YAML
class _YAML12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans (YAML 1.1 also reads
    yes/no/on/off as booleans, which turned ``mixed_precision: no`` into False) and ``1e-3`` is a
    number (YAML 1.1 needs a dot: ``1.0e-3``)."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def read_yaml(path: str, what: str = "config file", example: str = "configs/toy/l2.yaml") -> dict:
    """The mapping in the YAML file ``path`` (``{}`` for an empty file), or a ``ConfigError`` naming the
    file: missing, not valid YAML, or not a mapping at the top level."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist (expected a YAML file, e.g. {example})")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_YAML12Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data or {}


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``: a dotted key and a value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_YAML12Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return key, value


# ----------------------------------------------------------------------------- typing with OmegaConf
def _type_name(tp) -> str:
    """What a schema type expects, in words (for error messages)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _schema_type(schema, key: str):
    """The annotated type of ``key`` (``"model.block_out_channels[1]"``) in the dataclass ``schema``;
    ``None`` inside a free-form mapping (``objective.hparams.x``) or for an unknown key."""
    tp = schema
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("["):
            if typing.get_origin(tp) is not list:
                return None
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
            if tp is None:
                return None
        else:
            return None
    return tp


def _config_error(e: OmegaConfBaseException, schema, where: str) -> ConfigError:
    """OmegaConf's error as today's message: the file, the key and what was expected."""
    key = e.full_key or ""
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        parent = _schema_type(schema, key.rpartition(".")[0]) if "." in key else schema
        if dataclasses.is_dataclass(parent):
            names = ", ".join(f.name for f in dataclasses.fields(parent))
            return ConfigError(f"{where}: unknown key {key!r}; expected one of {names}")
    tp = _schema_type(schema, key) if key else None
    if isinstance(e, ValidationError) and tp is not None:
        value = OmegaConf.to_container(e.value) if OmegaConf.is_config(e.value) else e.value
        return ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return ConfigError(f"{where}: {key or 'config'}: {str(e).splitlines()[0]}")


def _set(cfg, schema, key: str, value) -> None:
    """Set the dotted ``key`` of the structured config ``cfg``: a mapping given for a section (a
    dataclass field) merges into it key by key; any other value replaces what is there."""
    parts = key.split(".")
    for i in range(1, len(parts)):          # every prefix must be a section or a free-form mapping
        tp = _schema_type(schema, ".".join(parts[:i]))
        if tp is not None and not (dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict):
            raise ConfigError(f"{parts[i - 1]!r} is not a section (in the key {key!r})")
    if isinstance(value, dict) and dataclasses.is_dataclass(_schema_type(schema, key)):
        for k, v in value.items():
            _set(cfg, schema, f"{key}.{k}", v)
        return
    OmegaConf.update(cfg, key, value, merge=False)


def structured(schema, data: dict, where: str, overrides: Iterable[tuple[str, Any]] = ()):
    """An instance of the dataclass ``schema`` from ``data`` (a nested mapping) then ``overrides``
    (dotted key, value), typed and merged by OmegaConf; a ``ConfigError`` naming ``where`` and the key."""
    cfg = OmegaConf.structured(schema)
    try:
        for key, value in [*data.items(), *overrides]:
            _set(cfg, schema, str(key), value)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _config_error(e, schema, where) from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: dict, where: str = "<config>", overrides: Iterable[tuple[str, Any]] = ()) -> Config:
    """A validated ``Config`` from a nested mapping (and dotted-key overrides)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    cfg = structured(Config, data, where, overrides)
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
                "eval.diag_samples": cfg.eval.diag_samples, "eval.likelihood_samples": cfg.eval.likelihood_samples,
                "data.dim": cfg.data.dim,
                "data.components": cfg.data.components}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{where}: {key} must be >= 1, got {v}")
    nonneg = {"train.warmup_steps": t.warmup_steps, "train.checkpoint_every": t.checkpoint_every,
              "eval.sample_every": cfg.eval.sample_every, "eval.diagnose_every": cfg.eval.diagnose_every,
              "train.weight_decay": t.weight_decay, "critic.weight_decay": cfg.critic.weight_decay}
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{where}: {key} must be >= 0, got {v}")
    if cfg.eval.diag_points < 1:
        raise ConfigError(f"{where}: eval.diag_points must be >= 1, got {cfg.eval.diag_points}")
    if cfg.eval.diag_solenoidal_points is not None and cfg.eval.diag_solenoidal_points < 1:
        raise ConfigError(f"{where}: eval.diag_solenoidal_points must be a positive number of points (or null: all "
                          f"of eval.diag_points), got {cfg.eval.diag_solenoidal_points}")
    if cfg.eval.diag_fit_steps < 1:
        raise ConfigError(f"{where}: eval.diag_fit_steps must be >= 1, got {cfg.eval.diag_fit_steps}")
    if cfg.eval.budget is not None and not cfg.eval.budget > 0:
        raise ConfigError(f"{where}: eval.budget must be > 0 or null, got {cfg.eval.budget}")
    if not cfg.eval.min_seconds >= 0:
        raise ConfigError(f"{where}: eval.min_seconds must be >= 0, got {cfg.eval.min_seconds}")
    if not t.lr > 0:
        raise ConfigError(f"{where}: train.lr must be > 0, got {t.lr}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1), got {t.ema_decay}")
    for key, v in (("train.clip_grad", t.clip_grad), ("critic.clip_grad", cfg.critic.clip_grad)):
        if v is not None and not v > 0:
            raise ConfigError(f"{where}: {key} must be > 0 or null, got {v}")
    b = cfg.critic.betas
    if b is not None and not (len(b) == 2 and all(0 <= v < 1 for v in b)):
        raise ConfigError(f"{where}: critic.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {b}")
    for i, s in enumerate(cfg.eval.diag_times):
        if not 0 < s <= 1:
            raise ConfigError(f"{where}: eval.diag_times[{i}] must be in (0, 1], got {s}")
    d = cfg.data
    if d.kind == "imagefolder" and not d.data_dir:
        raise ConfigError(f"{where}: data.data_dir is required for data.kind='imagefolder'")
    if d.kind == "hf" and not (d.name or d.data_dir):   # data_dir alone: a datasets save_to_disk folder
        raise ConfigError(f"{where}: data.name (a datasets name) is required for data.kind='hf'")
    if d.data_dir and d.kind in ("imagefolder",) and not os.path.isdir(os.path.expanduser(d.data_dir)):
        raise ConfigError(f"{where}: data.data_dir {d.data_dir!r} is not a directory")
    if d.kind != "toy" and cfg.model.kind == "mlp":
        raise ConfigError(f"{where}: model.kind='mlp' needs toy data; use model.kind='unet' for data.kind={d.kind!r}")
    if cfg.model.output == "edm" and cfg.sde.type != "edm":
        raise ConfigError(f"{where}: model.output='edm' needs sde.type='edm' (EDM's process and its sigma_data)")
    if cfg.model.num_classes < 0:
        raise ConfigError(f"{where}: model.num_classes must be >= 0 (0: unconditional), got {cfg.model.num_classes}")
    if cfg.model.num_classes > 0 and cfg.model.kind != "unet":
        raise ConfigError(f"{where}: model.num_classes > 0 needs model.kind='unet' (a class-conditional UNet2DModel)")
    if not 0 <= t.cond_dropout <= 1:
        raise ConfigError(f"{where}: train.cond_dropout must be in [0, 1], got {t.cond_dropout}")
    if (t.cond_dropout > 0 or cfg.eval.guidance_scale != 0) and cfg.model.num_classes == 0:
        raise ConfigError(f"{where}: train.cond_dropout and eval.guidance_scale need a class-conditional model "
                          "(model.num_classes > 0)")
    if d.kind == "toy" and d.autoencoder:
        raise ConfigError(f"{where}: data.autoencoder encodes images; data.kind='toy' has none")
    if d.kind == "toy" and cfg.model.kind == "unet":
        raise ConfigError(f"{where}: model.kind='unet' needs image data; use model.kind='mlp' for data.kind='toy'")


# ----------------------------------------------------------------------------- comparing configs
# keys a resumed run may change (with --allow-config-change; train.max_steps also through --max-steps): they
# decide how long the run goes and what it writes or evaluates, not the model, the objective, the data or
# the update rule, so the resumed steps stay those of an uninterrupted run.
RESUMABLE_CHANGES = ("train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                     "eval.")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.startswith("objective.hparams"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _with_defaults(saved: dict) -> dict:
    """A stored config with the schema's defaults for keys it lacks (written before they existed); as
    stored if it no longer validates."""
    try:
        return config_to_dict(structured(Config, saved, "stored config"))
    except ConfigError:
        return saved


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two config mappings (``config_to_dict``), as
    ``{key: (saved value, current value)}``; ``source`` (where a config was read from) is ignored, and a
    key either lacks (a config written before the key existed) takes the schema's default.
    ``objective.hparams`` compares as one value (its defaults are the objective's own)."""
    a, b = _flatten(_with_defaults(saved)), _flatten(_with_defaults(current))
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k != "source" and a.get(k, missing) != b.get(k, missing)}


def _listed(changes: dict) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_same_experiment(saved: dict, current: dict, where: str, ignored: Iterable[str] = (), hint: str = "") -> None:
    """Raise one ``ConfigError`` listing every key (but those starting with one of ``ignored``) in which
    ``current`` differs from ``saved``, the config stored at ``where``; ``hint`` ends the message."""
    bad = {k: v for k, v in config_changes(saved, current).items() if not k.startswith(tuple(ignored))}
    if bad:
        raise ConfigError(f"the config differs from {where} in {len(bad)} key(s): {_listed(bad)}"
                          + (f". {hint}" if hint else ""))


def check_resume_config(saved: dict, current: dict, where: str, allow_changes: bool = False,
                        allow_max_steps: bool = False) -> dict[str, tuple[Any, Any]]:
    """Whether a run whose checkpoint holds the config ``saved`` (at ``where``) may resume with ``current``.

    Keys outside ``RESUMABLE_CHANGES`` (model, objective, data, process, optimizer, seed) may never
    change; those inside only with ``allow_changes`` (``--allow-config-change``), and ``train.max_steps``
    also with ``allow_max_steps`` (``--max-steps``). Raises one ``ConfigError`` listing every offending
    key; returns the allowed changes (to log them)."""
    changes = config_changes(saved, current)
    unsafe = {k: v for k, v in changes.items() if not k.startswith(RESUMABLE_CHANGES)}
    safe = {k: v for k, v in changes.items() if k not in unsafe}
    held = {} if allow_changes else {k: v for k, v in safe.items() if not (allow_max_steps and k == "train.max_steps")}
    if unsafe or held:
        parts = []
        if unsafe:
            parts.append(f"{_listed(unsafe)} (these change the model, objective, data or update rule: resume with the "
                         f"checkpoint's config, or start a new --output-dir)")
        if held:
            parts.append(f"{_listed(held)} (safe to change: pass --allow-config-change"
                         + (", or --max-steps for train.max_steps" if "train.max_steps" in held else "") + ")")
        raise ConfigError(f"cannot resume: the config differs from {where} in {len(unsafe) + len(held)} key(s): "
                          + "; and ".join(parts))
    return safe


def load_config(path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and validate a YAML config; raises ``ConfigError`` before any compute."""
    path = os.fspath(path)
    data = read_yaml(path)
    parsed = [parse_override(item) for item in overrides]
    data.setdefault("source", path)
    return config_from_dict(data, path if not parsed else f"{path} (with overrides)", parsed)
