"""One registry of training objectives, the interface a training driver uses.

    spec = OBJECTIVES[name]           # "l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry"
    spec.parametrisation              # "score" (build a ScoreModel) or "energy" (build an EnergyScore)
    spec.needs_critic                 # build a gradscore.Critic and pass it
    spec.defaults                     # hyperparameters and their default values
    objective = build_objective(name, sde, critic=None, **hparams)

Every objective has ``objective(model, x0, t=None, noise=None, generator=None) -> [B]`` (per-sample
losses; the caller reduces), ``.name``, ``.critic`` (an ``nn.Module`` or ``None``; a driver may
replace it by its wrapped/prepared module: objectives always read the attribute), ``.n_critic``
(critic updates per score step: 0 without a critic) and ``.hparams`` (the resolved hyperparameters).
With a critic there is also ``critic_loss(model, x0, ...) -> [B]`` (score detached). Driver loop::

    opt = Optimizer([*model.parameters(), *objective.critic.parameters()])   # one optimizer
    loss = objective(model, x0).mean(); accelerator.backward(loss); opt.step(); opt.zero_grad()
    for _ in range(objective.n_critic - 1):                                    # extra critic steps
        objective.critic_loss(model, x0).mean() -> backward -> opt.step() -> opt.zero_grad()

The joint step updates the critic too (gradient reversal, see ``dual_sobolev``); ``critic_loss``
gives the model's parameters no gradient, so the extra steps move only the critic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from ..sde import SDE
from .asymmetry import AsymmetryPenalty
from .dsm import DSMLoss
from .dual_sobolev import DualSobolevLoss
from .energy import EnergyDSMLoss

__all__ = ["ObjectiveSpec", "OBJECTIVES", "build_objective"]

@dataclass(frozen=True)
class ObjectiveSpec:
    """How to build one objective.

    Attributes:
        name: registry key.
        parametrisation: ``"score"`` (``ScoreModel``) or ``"energy"`` (``EnergyScore``).
        needs_critic: whether ``build_objective`` needs a ``critic``.
        defaults: hyperparameter names and default values (read-only).
        factory: ``(sde, critic, **hparams) -> objective``.
        description: one line for help texts and logs.
    """

    name: str
    parametrisation: str
    needs_critic: bool
    defaults: Mapping
    factory: Callable = field(repr=False)
    description: str = ""

    def build(self, sde: SDE, critic=None, **hparams):
        """Same as ``build_objective(self.name, sde, critic, **hparams)``."""
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a gradscore.SDE, got {type(sde).__name__}")
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for objective {self.name!r}; "
                             f"valid: {sorted(self.defaults) or 'none'}")
        resolved = {**self.defaults, **hparams}
        if self.needs_critic and critic is None:
            raise ValueError(f"objective {self.name!r} needs a critic: pass critic=gradscore.Critic(backbone, sde) "
                             "with a scalar backbone, e.g. TimeMLP(d, out_dim=1)")
        if not self.needs_critic and critic is not None:
            raise ValueError(f"objective {self.name!r} takes no critic (got {type(critic).__name__}); "
                             f"objectives with a critic: {sorted(k for k, s in OBJECTIVES.items() if s.needs_critic)}")
        objective = self.factory(sde, critic, **resolved)
        objective.hparams = dict(resolved)
        return objective


def _l2(sde, critic, weighting):
    return DSMLoss(sde, weighting=weighting)


def _energy(sde, critic, weighting):
    return EnergyDSMLoss(sde, weighting=weighting)


def _dual_sobolev(sde, critic, weighting, n_critic, l2_weight=0.0):
    return DualSobolevLoss(sde, critic, weighting=weighting, l2_weight=l2_weight, n_critic=n_critic)


def _asymmetry(sde, critic, weighting, asymmetry_weight, probes, probe):
    return AsymmetryPenalty(sde, weighting=weighting, asymmetry_weight=asymmetry_weight, probes=probes, probe=probe)


_SPECS = [
    ObjectiveSpec("l2", "score", False, MappingProxyType({"weighting": "sigma2"}), _l2,
                  "denoising score matching: lambda |s + eps/sigma|^2"),
    ObjectiveSpec("energy", "energy", False, MappingProxyType({"weighting": "sigma2"}), _energy,
                  "DSM on a conservative model s = -grad E (error lies in the gradient part)"),
    ObjectiveSpec("dual_sobolev", "score", True, MappingProxyType({"weighting": "sigma2", "n_critic": 5}),
                  _dual_sobolev, "min-max projection term: only the observable gradient part is trained"),
    ObjectiveSpec("l2+dual_sobolev", "score", True,
                  MappingProxyType({"weighting": "sigma2", "n_critic": 1, "l2_weight": 1.0}), _dual_sobolev,
                  "DSM plus the projection term: ||e||^2 + ||Pi_G e||^2"),
    ObjectiveSpec("asymmetry", "score", False,
                  MappingProxyType({"weighting": "sigma2", "asymmetry_weight": 1.0, "probes": 1, "probe": "rademacher"}),
                  _asymmetry, "DSM plus a Hutchinson Jacobian-asymmetry penalty (quasi-conservative baseline)"),
]

OBJECTIVES: Mapping[str, ObjectiveSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})


def build_objective(name: str, sde: SDE, critic=None, **hparams):
    """Build the objective registered as ``name`` (see ``OBJECTIVES``).

    Args:
        name: one of ``OBJECTIVES``.
        sde: the forward process.
        critic: a ``gradscore.Critic`` when ``OBJECTIVES[name].needs_critic`` (else ``None``).
        **hparams: overrides of ``OBJECTIVES[name].defaults``; unknown names and negative weights raise
            ``ValueError``.
    Returns:
        an objective ``(model, x0, t=None, noise=None, generator=None) -> [B]`` with ``.name``,
        ``.critic``, ``.n_critic``, ``.hparams`` (and ``critic_loss`` when it has a critic).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")
    return OBJECTIVES[name].build(sde, critic, **hparams)
