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
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lr'\].*valid: \['reduction', 'weighting'\]"):
        gs.build_objective("l2", sde, lr=1e-3)
    with pytest.raises(ValueError, match=r"\['l2_weight'\].*valid: \['n_critic', 'reduction', 'weighting'\]"):
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


def test_every_objective_is_an_objective_with_hparams_that_rebuild_it():
    """One interface: built by hand or by the registry, every objective is an ``Objective`` with ``name``,
    ``critic``, ``n_critic`` and ``hparams``; ``build_objective(obj.name, sde, critic, **obj.hparams)``
    rebuilds an objective with the same name and hyperparameters."""
    sde = gs.VPSDE()
    critic = gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), sde)
    by_hand = [gs.DSMLoss(sde), gs.EnergyDSMLoss(sde, weighting="likelihood"), gs.DualSobolevLoss(sde, critic),
               gs.DualSobolevLoss(sde, critic, l2_weight=2, n_critic=3), gs.AsymmetryPenalty(sde, probes=2)]
    assert by_hand[0].hparams == {"weighting": "sigma2", "reduction": "sum"}
    assert by_hand[3].hparams == {"weighting": "sigma2", "n_critic": 3, "l2_weight": 2.0, "reduction": "sum"}
    assert by_hand[4].hparams["penalty_weighting"] == "lambda_sigma2"
    built = [obj for obj, _ in build_all(sde).values()]
    for obj in by_hand + built:
        assert isinstance(obj, gs.Objective), type(obj).__name__
        assert obj.name in gs.OBJECTIVES and obj.hparams.keys() == gs.OBJECTIVES[obj.name].defaults.keys()
        again = gs.build_objective(obj.name, sde, critic=obj.critic, **obj.hparams)
        assert (again.name, again.hparams, again.n_critic) == (obj.name, obj.hparams, obj.n_critic)


def test_validate_fills_defaults_and_names_key_objective_and_expected_type():
    spec = gs.OBJECTIVES["dual_sobolev"]
    assert spec.validate({}) == dict(spec.defaults)
    assert gs.OBJECTIVES["l2+dual_sobolev"].validate({"l2_weight": 2}) == {"weighting": "sigma2", "n_critic": 1,
                                                                            "l2_weight": 2.0, "reduction": "sum"}
    bad = [  # (objective, hparams, message)
        ("dual_sobolev", {"n_critic": "two"},
         r"objective 'dual_sobolev': n_critic must be int >= 1.*got 'two' \(str\)"),
        ("dual_sobolev", {"n_critic": 2.0}, r"n_critic must be int >= 1.*got 2.0 \(float\)"),
        ("dual_sobolev", {"n_critic": True}, r"n_critic must be int >= 1.*got True \(bool\)"),
        ("l2+dual_sobolev", {"l2_weight": "1"},
         r"'l2\+dual_sobolev': l2_weight must be a non-negative number.*\(str\)"),
        ("l2+dual_sobolev", {"l2_weight": float("nan")}, r"l2_weight must be a non-negative number.*nan"),
        ("asymmetry", {"probe": "sphere"}, r"probe must be one of \['rademacher', 'gaussian'\]"),
        ("asymmetry", {"penalty_weighting": "paper"},
         r"penalty_weighting must be one of \['lambda_sigma2', 'sigma2'\]"),
        ("l2", {"weighting": 3},
         r"'l2': weighting must be one of \['edm', 'likelihood', 'min_snr', 'none', 'sigma2'\].*got 3 \(int\)"),
        ("l2", {"lr": 1e-3},
         r"unknown hyperparameter\(s\) \['lr'\] for objective 'l2'; valid: \['reduction', 'weighting'\]"),
    ]
    for name, hparams, message in bad:
        with pytest.raises(ValueError, match=message):
            gs.OBJECTIVES[name].validate(hparams)
    with pytest.raises(TypeError, match="mapping"):
        spec.validate([("n_critic", 2)])
    # the classes validate with the same table, naming themselves
    with pytest.raises(ValueError, match=r"objective 'DualSobolevLoss': n_critic must be int >= 1"):
        gs.DualSobolevLoss(gs.VPSDE(), gs.Critic(gs.TimeMLP(2, 8, 1, out_dim=1), gs.VPSDE()), n_critic="two")
    with pytest.raises(ValueError, match=r"objective 'DSMLoss': weighting must be one of"):
        gs.DSMLoss(gs.VPSDE(), weighting="eps")


def test_phases_state_the_recipe_critic_steps_first():
    """``phases()``: ``n_critic - 1`` critic-only phases (the score model gets no gradient) before the
    joint phase; one phase for objectives without a critic, which have no critic_loss."""
    sde = gs.VPSDE()
    objs = build_all(sde)
    for name, (obj, _) in objs.items():
        phases = obj.phases()
        assert len(phases) == max(obj.n_critic, 1) and phases[-1].name == name and phases[-1].trains_model
        assert all(p.name == "critic_loss" and not p.trains_model for p in phases[:-1])
    assert [p.name for p in objs["dual_sobolev"][0].phases()] == ["critic_loss"] * 4 + ["dual_sobolev"]
    with pytest.raises(TypeError, match="'l2' has no critic"):
        objs["l2"][0].critic_loss(objs["l2"][1], torch.randn(4, 2))


def _recipe_by_hand(obj, model, batches, opt, g):
    for phase, x0 in zip(obj.phases(), batches):
        opt.zero_grad(set_to_none=True)
        phase.loss(model, x0, generator=g).mean().backward()
        opt.step()


def test_train_step_runs_the_phases_in_order():
    """Oracle: the same phases written out by hand (same batches, same generator) leave bitwise the same
    parameters; the critic-only phases leave the score model's parameters untouched."""
    sde = gs.VPSDE()
    batches = [torch.randn(8, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def setup():
        torch.manual_seed(0)
        model = gs.ScoreModel(gs.TimeMLP(2, 16, 2), sde)
        critic = gs.Critic(gs.TimeMLP(2, 16, 2, out_dim=1), sde)
        obj = gs.build_objective("dual_sobolev", sde, critic=critic, n_critic=3)
        return model, obj, torch.optim.Adam([*model.parameters(), *critic.parameters()], lr=1e-2)

    model, obj, opt = setup()
    it = iter(batches)
    loss = gs.train_step(obj, model, lambda: next(it), opt, generator=torch.Generator().manual_seed(5))
    ref_model, ref_obj, ref_opt = setup()
    before = [p.detach().clone() for p in ref_model.parameters()]
    critic_before = [p.detach().clone() for p in ref_obj.critic.parameters()]
    g = torch.Generator().manual_seed(5)
    _recipe_by_hand(ref_obj, ref_model, batches[:2], ref_opt, g)           # the two critic-only phases
    assert all(torch.equal(a, p) for a, p in zip(before, ref_model.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(critic_before, ref_obj.critic.parameters()))
    ref_opt.zero_grad(set_to_none=True)
    ref_loss = ref_obj(ref_model, batches[2], generator=g).mean()
    ref_loss.backward()
    ref_opt.step()
    assert torch.equal(loss, ref_loss.detach())
    for a, b in zip([*model.parameters(), *obj.critic.parameters()],
                    [*ref_model.parameters(), *ref_obj.critic.parameters()]):
        assert torch.equal(a, b)


def test_train_step_clips_the_gradient_norm():
    """With SGD (lr 1) the update is minus the gradient, so clipping at c bounds the update's norm by c
    (float32 rounding: 1e-5 relative); clip must be positive."""
    sde = gs.VPSDE()
    torch.manual_seed(0)
    model = gs.ScoreModel(gs.TimeMLP(2, 16, 2), sde)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    gs.train_step(gs.DSMLoss(sde), model, torch.randn(64, 2), opt, clip=1e-3)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert 0.5e-3 < float(step.norm()) <= 1e-3 * (1 + 1e-5)
    with pytest.raises(ValueError, match="clip must be a positive number"):
        gs.train_step(gs.DSMLoss(sde), model, torch.randn(4, 2), opt, clip=0)
