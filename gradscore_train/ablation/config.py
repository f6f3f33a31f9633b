"""Step 1 of an ablation, its config: a grid of training runs (objectives x seeds x hyperparameters)
under one budget.

``load_ablation(path) -> Ablation`` reads and validates the YAML (unknown key, wrong type -> one
``ConfigError`` naming it, as for training configs) and checks that every run's training config
builds, before any compute. ``Ablation.runs()`` lists the ``RunSpec`` of the grid.

Matched budget: every run is ``base`` + ``overrides`` (+ one grid point) + its objective; only
``objective.*`` differs between objectives, so steps, batch, backbone, learning rate and the data
order (drawn from ``train.seed`` alone, see ``gradscore_train/data.py``) are the same. Besides the grid:
``launcher`` (how runs are executed), ``assessment`` (how every model is assessed), ``study`` (the
correlation study).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from ..config import Config, ConfigError, load_config, read_yaml, structured

__all__ = ["Ablation", "AblationSchema", "LauncherConfig", "AssessmentConfig", "StudyConfig", "RunSpec",
           "load_ablation"]


@dataclass
class LauncherConfig:
    """How each run is executed.

    ``inprocess``: ``gradscore_train.loop.run`` in this process, one run after another. ``subprocess``: each
    run in a fresh ``python -m gradscore_train.ablate CONFIG --run-one ID``, ``parallel`` at a time. ``accelerate``:
    each run through ``accelerate launch --multi_gpu --num_processes N`` (gloo on CPU)."""
    kind: Literal["inprocess", "subprocess", "accelerate"] = "inprocess"
    num_processes: int = 2          # accelerate
    parallel: int = 1               # subprocess: runs at once
    threads: int | None = None   # OMP/torch threads per run (None: leave as is)
    extra_args: list[str] = field(default_factory=list)   # appended to `accelerate launch`


@dataclass
class AssessmentConfig:
    """How every model of the ablation is assessed (``assessment.assess``): identical for every model
    (same seeds: paired comparisons). Not the run's own ``EvalConfig`` (``eval:``, during training)."""
    num_samples: int = 2000         # samples for quality
    sample_steps: int = 300
    method: Literal["sde", "ode"] = "sde"
    num_data: int = 256             # data points x0 for the diagnostics
    num_points: int = 4096          # points of p_t per time (x0 noised num_points / num_data times)
    num_times: int = 8              # diagnostic time grid (gradscore.diagnostics.default_times)
    num_features: int = 128         # random Fourier features of the gradient dictionary (+ quadratics)
    siem_particles: int = 1000
    siem_steps: int = 300
    seed: int = 1234
    fit_steps: int = 200            # images: optimizer steps of each network of the neural decomposition
    solenoidal_points: int | None = None   # images: of num_points, those of the solenoidal part (None: all)
    likelihood_samples: int = 0     # images: data points for bits/dim (probability-flow ODE); 0: not a predictor
    likelihood_rtol: float = 1e-5   # images: rtol = atol of the ODE solver of bits/dim


@dataclass
class StudyConfig:
    """The correlation study: trained checkpoints plus perturbed exact scores."""
    enabled: bool = True
    quality: Literal["energy_distance", "sliced_wasserstein", "nll", "classifier_fd"] = "energy_distance"
    rotations: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])       # s + c J s
    gradient_errors: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])  # s + a grad phi
    combinations: list[list[float]] = field(default_factory=lambda: [[0.25, 2.0], [0.5, 1.0], [0.1, 4.0]])  # [a, c]
    intermediate_checkpoints: bool = True   # every kept checkpoint of every run, not only the last
    bootstrap: int = 2000
    confidence: float = 0.95


@dataclass
class AblationSchema:
    name: str = "ablation"
    base: str = "configs/toy/l2.yaml"          # training config every run starts from
    output_dir: str | None = None           # default runs/ablations/<name>
    objectives: dict = field(default_factory=lambda: {"l2": {}})   # name -> hparams ({} = defaults)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict = field(default_factory=dict)   # dotted key -> value, applied to every run
    grid: dict = field(default_factory=dict)        # dotted key -> list of values, crossed with the rest
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    assessment: AssessmentConfig = field(default_factory=AssessmentConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


@dataclass
class RunSpec:
    """One training run of the grid: ``config`` is validated; ``run_dir`` is where it trains."""
    run_id: str                  # e.g. "l2/seed-0" or "l2+dual_sobolev/l2_weight=0.5/seed-1"
    objective: str
    seed: int
    point: dict                  # the grid point (dotted key -> value)
    config: Config
    run_dir: str

    @property
    def label(self) -> str:
        """The objective and grid point, without the seed (runs averaged over seeds share it)."""
        return "/".join([self.objective] + [f"{k.split('.')[-1]}={v}" for k, v in self.point.items()])


def _override_strings(mapping: dict, where: str) -> list[str]:
    out = []
    for k, v in mapping.items():
        if not isinstance(k, str) or "." not in k:
            raise ConfigError(f"{where}: override key {k!r} must be dotted, like train.max_steps")
        out.append(f"{k}={json.dumps(v)}")
    return out


class Ablation:
    """A validated ablation: ``schema`` (the YAML), ``path``, ``output_dir``, ``runs()``."""

    def __init__(self, schema: AblationSchema, path: str):
        self.schema, self.path = schema, path
        self.output_dir = schema.output_dir or os.path.join("runs", "ablations", schema.name)
        self._runs = self._expand()

    def _base_path(self) -> str:
        base = self.schema.base
        if os.path.isfile(base):
            return base
        beside = os.path.join(os.path.dirname(os.path.abspath(self.path)), base)
        if os.path.isfile(beside):
            return beside
        raise ConfigError(f"{self.path}: base {base!r} does not exist (a training config, e.g. configs/toy/l2.yaml)")

    def _expand(self) -> list[RunSpec]:
        s, where = self.schema, self.path
        if not s.objectives:
            raise ConfigError(f"{where}: objectives must name at least one objective")
        if not s.seeds:
            raise ConfigError(f"{where}: seeds must hold at least one seed")
        if len(set(s.seeds)) != len(s.seeds):
            raise ConfigError(f"{where}: seeds must be distinct, got {s.seeds}")
        sp = s.assessment.solenoidal_points
        if sp is not None and sp < 1:
            raise ConfigError(f"{where}: assessment.solenoidal_points must be a positive number of points (or null: "
                              f"all of num_points), got {sp}")
        for k, vals in s.grid.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{where}: grid.{k} must be a non-empty list of values, got {vals!r}")
        base = self._base_path()
        common = _override_strings(s.overrides, f"{where} overrides")
        keys = list(s.grid)
        runs = []
        for objective, hparams in s.objectives.items():
            if hparams is not None and not isinstance(hparams, dict):
                raise ConfigError(f"{where}: objectives.{objective} must be a mapping of hyperparameters, "
                                  f"got {hparams!r}")
            obj = [f"objective.name={json.dumps(objective)}", f"objective.hparams={json.dumps(hparams or {})}"]
            # a grid over objective.hparams.X applies to the objectives that have X; the others run once
            mine = [k for k in keys
                    if not (k.startswith("objective.hparams.") and k.split(".")[-1] not in _defaults(objective))]
            for values in itertools.product(*(s.grid[k] for k in mine)):
                point = dict(zip(mine, values))
                for seed in s.seeds:
                    ov = common + obj + _override_strings(point, f"{where} grid") + [f"train.seed={int(seed)}"]
                    try:
                        cfg = load_config(base, ov)
                        from ..build import check_objective_config
                        check_objective_config(cfg)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: run {objective} {point or ''} seed {seed}: {e}") from None
                    parts = [objective] + [f"{k.split('.')[-1]}={v}" for k, v in point.items()] + [f"seed-{seed}"]
                    run_id = "/".join(parts)
                    run_dir = os.path.join(self.output_dir, "runs", *parts)
                    runs.append(RunSpec(run_id, objective, int(seed), point, cfg, run_dir))
        return runs

    def runs(self) -> list[RunSpec]:
        return list(self._runs)

    def run(self, run_id: str) -> RunSpec:
        for r in self._runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"no run {run_id!r} in {self.path}; runs are {[r.run_id for r in self._runs]}")


def _defaults(objective: str) -> dict:
    from ..build import objective_spec
    return dict(objective_spec(objective).defaults)


def load_ablation(path, overrides: dict | None = None) -> Ablation:
    """Read and validate an ablation YAML; ``overrides`` (a nested mapping, e.g. ``{"study": {"enabled":
    False}}``) is merged over it like the file over the defaults: a section merges, any other value replaces."""
    path = os.fspath(path)
    data = read_yaml(path, "ablation file", "configs/ablations/toy.yaml")
    overrides = dict(overrides or {})
    for mapping in (data, overrides):          # objectives may be a plain list of names
        if isinstance(mapping.get("objectives"), list):
            mapping["objectives"] = {name: {} for name in mapping["objectives"]}
    schema = structured(AblationSchema, data, path, overrides.items())
    return Ablation(schema, path)
