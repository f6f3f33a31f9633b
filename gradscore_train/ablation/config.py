"""Step 1 of an ablation, its config: a grid of training runs (objectives x seeds x hyperparameters)
under one budget.

``load_ablation(path) -> Ablation`` reads and validates the YAML (unknown key, wrong type -> one
``ConfigError`` naming it, as for training configs) and checks that every run's training config
builds, before any compute. ``Ablation.runs()`` lists the ``RunSpec`` of the grid.

Matched budget: every run is ``base`` + ``overrides`` (+ one grid point) + its objective; only
``objective.*`` differs between objectives, so steps, batch, backbone, learning rate and the data
order (drawn from ``train.seed`` alone, see ``gradscore_train/data.py``) are the same. ``budget.wall_time``
adds a second arm at equal wall time: the same runs with ``train.max_steps`` from the pilot's frozen
``step_costs.json`` (``wall_time.py``; ``RunSpec.arm`` tells the arms apart). Besides the grid:
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

__all__ = ["Ablation", "AblationSchema", "BudgetConfig", "LauncherConfig", "AssessmentConfig", "StudyConfig", "RunSpec",
           "is_reference", "load_ablation"]


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
class BudgetConfig:
    """The matched budgets. Every run of the grid has the same steps (``overrides``); with ``wall_time`` set to
    an objective of the grid (or an objective with grid values, ``dual_sobolev/n_critic=5``: ``is_reference``),
    every other label also runs for the wall time the reference's steps take:
    ``steps_o = round(steps * c_ref / c_o)`` with ``c`` its seconds per optimizer step, timed side by side in one
    process by a pilot (``wall_time.py``) and frozen in ``<output_dir>/step_costs.json`` on the first invocation."""
    wall_time: str | None = None    # reference: an objective (energy) or one at grid values (dual_sobolev/n_critic=5)
    pilot_steps: int = 20           # timed steps per objective per round (after 3 warm-up steps)
    pilot_rounds: int = 3           # rounds over the objectives; the median per objective is kept


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
    budget: BudgetConfig = field(default_factory=BudgetConfig)
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
    arm: str = "steps"           # the matched budget it belongs to: "steps", or "wall_time" (budget.wall_time)

    @property
    def label(self) -> str:
        """The objective and grid point, without the seed (runs averaged over seeds share it)."""
        return "/".join(_label_parts(self.objective, self.point))

    @property
    def base_label(self) -> str:
        """The label of the equal-steps runs this one is compared with: ``label`` without the wall-time arm's steps."""
        point = self.point
        if self.arm == "wall_time":
            point = {k: v for k, v in point.items() if k != "train.max_steps"}
        return "/".join(_label_parts(self.objective, point))


def _label_parts(objective: str, point: dict) -> list[str]:
    """``[objective, "key=value", ...]`` (the last component of each dotted grid key): a label's and a run
    directory's parts."""
    return [objective] + [f"{k.split('.')[-1]}={v}" for k, v in point.items()]


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
        ref = s.budget.wall_time
        if ref is not None and ref.split("/")[0] not in s.objectives:
            raise ConfigError(f"{where}: budget.wall_time must name one of the objectives {list(s.objectives)} "
                              f"(the reference whose wall time the others get), got {ref!r}")
        if s.budget.pilot_steps < 1 or s.budget.pilot_rounds < 1:
            raise ConfigError(f"{where}: budget.pilot_steps and budget.pilot_rounds must be positive, got "
                              f"{s.budget.pilot_steps} and {s.budget.pilot_rounds}")
        self._base = self._base_path()                 # a missing base is named before any run is built
        runs = self._grid()
        if ref is not None and not any(is_reference(r.label, ref) for r in runs):
            raise ConfigError(f"{where}: budget.wall_time {ref!r} matches no run of the grid; name an objective or an "
                              f"objective with grid values, one of {sorted({r.label for r in runs})}")
        if ref is not None and os.path.isfile(self.step_costs_path):
            steps = read_step_costs(self.step_costs_path, ref, runs[0].config.train.max_steps)["steps"]
            for r in list(runs):
                if is_reference(r.label, ref):          # the reference's equal-steps run is its equal-time run
                    continue
                n = steps.get(r.label)
                if n is None:
                    raise ConfigError(f"{self.step_costs_path}: no steps for {r.label!r}; delete the file to time "
                                      "the grid again")
                runs.append(self._run_spec(r.objective, r.point, r.seed, s.overrides | {"train.max_steps": int(n)},
                                           "wall_time"))
        return runs

    @property
    def step_costs_path(self) -> str:
        """Where the pilot's seconds per step and the equal-wall-time steps are frozen (``wall_time.py``)."""
        return os.path.join(self.output_dir, "step_costs.json")

    def _grid(self) -> list[RunSpec]:
        """The equal-steps runs ``objectives x grid x seeds``."""
        s, where = self.schema, self.path
        runs = []
        for objective, hparams in s.objectives.items():
            if hparams is not None and not isinstance(hparams, dict):
                raise ConfigError(f"{where}: objectives.{objective} must be a mapping of hyperparameters, "
                                  f"got {hparams!r}")
            # a grid over objective.hparams.X applies to the objectives that have X, one over critic.* to those
            # with a critic; the others run once
            mine = [k for k in s.grid
                    if not (k.startswith("objective.hparams.") and k.split(".")[-1] not in _defaults(objective))
                    and not (k.startswith("critic.") and not _needs_critic(objective))]
            for values in itertools.product(*(s.grid[k] for k in mine)):
                point = dict(zip(mine, values))
                runs += [self._run_spec(objective, point, seed, s.overrides, "steps") for seed in s.seeds]
        return runs

    def _run_spec(self, objective: str, point: dict, seed: int, overrides: dict, arm: str) -> RunSpec:
        """One run, its training config validated. The wall-time arm's runs live under
        ``<objective>/.../max_steps=N/seed-S``."""
        where = self.path
        obj = [f"objective.name={json.dumps(objective)}",
               f"objective.hparams={json.dumps(self.schema.objectives[objective] or {})}"]
        ov = (_override_strings(overrides, f"{where} overrides") + obj + _override_strings(point, f"{where} grid")
              + [f"train.seed={int(seed)}"])
        try:
            cfg = load_config(self._base, ov)
            from ..build import check_objective_config
            check_objective_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: run {objective} {point or ''} seed {seed}: {e}") from None
        if arm == "wall_time":            # the steps are part of what tells the run apart
            point = point | {"train.max_steps": cfg.train.max_steps}
        parts = _label_parts(objective, point) + [f"seed-{seed}"]
        return RunSpec("/".join(parts), objective, int(seed), point, cfg, os.path.join(self.output_dir, "runs", *parts),
                       arm)

    def runs(self, arm: str | None = None) -> list[RunSpec]:
        """The runs of the grid (``arm``: of that matched budget only, ``"steps"`` or ``"wall_time"``); the
        wall-time arm appears once its steps are known (``step_costs_path`` exists)."""
        return [r for r in self._runs if arm is None or r.arm == arm]

    def refresh(self) -> None:
        """Expand the grid again (after the pilot wrote ``step_costs_path``)."""
        self._runs = self._expand()

    def run(self, run_id: str) -> RunSpec:
        for r in self._runs:
            if r.run_id == run_id:
                return r
        raise KeyError(f"no run {run_id!r} in {self.path}; runs are {[r.run_id for r in self._runs]}")


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, renamed into place (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_step_costs(path: str, reference: str, reference_steps: int) -> dict:
    """The frozen pilot of ``path``: ``{"reference", "reference_steps", "seconds_per_step": {label: s},
    "steps": {label: n}, ...}``; a ``ConfigError`` naming the file when it is unreadable or was timed for another
    reference or step count."""
    try:
        with open(path) as f:
            costs = json.load(f)
        ref, steps = costs["reference"], costs["reference_steps"]
        costs["steps"], costs["seconds_per_step"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: unreadable step costs ({e!r}); delete it to time the grid again") from None
    if ref != reference or steps != reference_steps:
        raise ConfigError(f"{path}: timed for reference {ref!r} at {steps} steps, but the ablation asks for "
                          f"{reference!r} at {reference_steps} steps; delete the file to time the grid again")
    return costs


def is_reference(label: str, reference: str | None) -> bool:
    """Whether the run labelled ``label`` (``RunSpec.label``) belongs to the wall-time reference ``reference``: an
    objective (``"energy"``: all its runs) or an objective with grid values (``"dual_sobolev/n_critic=5"``: the runs
    of that objective at those values, whatever the other grid keys)."""
    if reference is None:
        return False
    name, *fixed = reference.split("/")
    objective, *parts = label.split("/")
    return objective == name and all(f in parts for f in fixed)


def _needs_critic(objective: str) -> bool:
    from ..build import objective_spec
    return bool(objective_spec(objective).needs_critic)


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
