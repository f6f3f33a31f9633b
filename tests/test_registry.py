"""The objective registry: the interface the training driver relies on, and its errors."""
import pytest
import torch
from torch import nn

import gradscore as gs

EXPECTED = {  # name: (parametrisation, needs_critic)
    "l2": ("score", False),
    "energy": ("energy", False),
    "dual_sobolev": ("score", True),
    "l2+dual_sobolev": ("score", True),
    "asymmetry": ("score", False),
}


def build_all(sde, d=2):
    """(objective, model) for every registered objective, built as the driver does."""
    out = {}
    for name, spec in gs.OBJECTIVES.items():
        torch.manual_seed(0)
        backbone = gs.TimeMLP(d, 16, 2)
        model = gs.EnergyScore(backbone, sde) if spec.parametrisation == "energy" else gs.ScoreModel(backbone, sde)
        critic = gs.Critic(gs.TimeMLP(d, 16, 2, out_dim=1), sde) if spec.needs_critic else None
        out[name] = (gs.build_objective(name, sde, critic=critic), model)
    return out


def test_registry_lists_the_five_objectives_with_their_specs():
    assert list(gs.OBJECTIVES) == list(EXPECTED)
    for name, (param, needs_critic) in EXPECTED.items():
        spec = gs.OBJECTIVES[name]
        assert (spec.name, spec.parametrisation, spec.needs_critic) == (name, param, needs_critic)
        assert "weighting" in spec.defaults
    assert gs.OBJECTIVES["l2+dual_sobolev"].defaults["l2_weight"] > 0
    with pytest.raises(TypeError):
        gs.OBJECTIVES["l2"] = None                                 # read-only mapping


def test_every_objective_has_the_driver_interface_and_per_sample_losses():
    sde = gs.VPSDE()
    x0 = torch.randn(6, 2)
    for name, (obj, model) in build_all(sde).items():
        assert obj.name == name
        assert obj.hparams == dict(gs.OBJECTIVES[name].defaults)
        needs_critic = gs.OBJECTIVES[name].needs_critic
        assert isinstance(obj.critic, nn.Module) if needs_critic else obj.critic is None
        assert isinstance(obj.n_critic, int) and obj.n_critic == gs.OBJECTIVES[name].defaults.get("n_critic", 0)
        assert (obj.n_critic >= 1) == needs_critic
        loss = obj(model, x0, generator=torch.Generator().manual_seed(0))
        assert loss.shape == (6,) and torch.isfinite(loss).all()
        # same generator, same draws: reproducible
        torch.testing.assert_close(loss, obj(model, x0, generator=torch.Generator().manual_seed(0)))
        loss.mean().backward()
        assert all(p.grad is not None for p in model.parameters()), name
        if needs_critic:
            assert all(p.grad is not None for p in obj.critic.parameters())
            assert obj.critic_loss(model, x0, t=0.5).shape == (6,)


def test_hyperparameters_are_passed_through():
    sde = gs.VPSDE()
    critic = gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), sde)
    obj = gs.build_objective("l2+dual_sobolev", sde, critic=critic, l2_weight=0.25, n_critic=3, weighting="likelihood")
    assert (obj.l2_weight, obj.n_critic, obj.hparams["weighting"]) == (0.25, 3, "likelihood")
    obj = gs.build_objective("asymmetry", sde, asymmetry_weight=0.5, probes=2, probe="gaussian")
    assert (obj.asymmetry_weight, obj.probes, obj.probe) == (0.5, 2, "gaussian")


def test_bad_names_and_hyperparameters_raise_clear_errors():
    sde = gs.VPSDE()
    critic = gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), sde)
    with pytest.raises(ValueError, match=r"unknown objective 'sobolev'.*'l2'"):
        gs.build_objective("sobolev", sde)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lr'\].*valid: \['weighting'\]"):
        gs.build_objective("l2", sde, lr=1e-3)
    with pytest.raises(ValueError, match=r"\['l2_weight'\].*valid: \['n_critic', 'weighting'\]"):
        gs.build_objective("dual_sobolev", sde, critic=critic, l2_weight=1.0)
    with pytest.raises(ValueError, match="l2_weight must be a non-negative"):
        gs.build_objective("l2+dual_sobolev", sde, critic=critic, l2_weight=-0.5)
    with pytest.raises(ValueError, match="asymmetry_weight must be a non-negative"):
        gs.build_objective("asymmetry", sde, asymmetry_weight=-1)
    with pytest.raises(ValueError, match="n_critic"):
        gs.build_objective("dual_sobolev", sde, critic=critic, n_critic=0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        gs.build_objective("l2", sde, weighting="sigma")
    with pytest.raises(ValueError, match="needs a critic"):
        gs.build_objective("dual_sobolev", sde)
    with pytest.raises(ValueError, match="takes no critic"):
        gs.build_objective("l2", sde, critic=critic)
    with pytest.raises(TypeError, match="sde must be"):
        gs.build_objective("l2", "vp")


def test_shape_errors_name_the_shapes():
    sde = gs.VPSDE()
    objs = build_all(sde)
    obj, model = objs["asymmetry"]
    with pytest.raises(ValueError, match="noise has shape"):
        obj(model, torch.randn(4, 2), noise=torch.randn(5, 2))
    obj, model = objs["energy"]
    with pytest.raises(TypeError, match="EnergyScore"):
        obj(objs["l2"][1], torch.randn(4, 2))
    obj, model = objs["dual_sobolev"]
    obj.critic = gs.Critic(gs.TimeMLP(2, 8, 1), sde)               # vector backbone: not one scalar per sample
    with pytest.raises(ValueError, match=r"one scalar per sample.*\(4, 2\)"):
        obj(model, torch.randn(4, 2))


def test_every_objective_runs_under_bf16_autocast():
    # Mixed precision as accelerate runs it: x_t stays fp32 (it is differentiated), losses come out fp32.
    sde = gs.VPSDE()
    x0 = torch.randn(6, 2)
    for name, (obj, model) in build_all(sde).items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = obj(model, x0, generator=torch.Generator().manual_seed(0))
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), name
        loss.mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()), name
