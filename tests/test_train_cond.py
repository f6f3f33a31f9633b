"""Class-conditional training in the driver (configs/digits_cond/): labels from the data to the UNet and the
critic, condition dropout to the null label, guided samples, and the errors for unlabelled data."""
from __future__ import annotations

import os

import pytest
import torch

from gradscore_train.build import check_labels
from gradscore_train.config import ConfigError, load_config
from gradscore_train.data import TensorSource
from gradscore_train.loop import Trainer, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train.checkpoint_every=0", "train.warmup_steps=2", "eval.num_samples=16", "eval.sample_steps=2",
        "eval.diag_samples=16", "eval.diag_times=[0.5]", "eval.quality=false", "train.log_every=1",
        "train.batch_size=8", "data.max_images=40", "model.block_out_channels=[16,32]",
        "critic.block_out_channels=[8,16]"]


def cond_config(objective, *extra):
    return load_config(os.path.join(ROOT, "configs", "digits_cond", f"{objective}.yaml"), FAST + list(extra))


@pytest.mark.slow
def test_labels_reach_the_loss_with_condition_dropout(tmp_path):
    """Trainer._labels: the labels of the micro-batch's examples (BatchPlan.indices), each replaced by the null
    label 10 with probability train.cond_dropout = 0.5; 4 steps x 64 labels: the dropped fraction within 4 binomial
    standard errors of 0.5, every kept label equal to its example's label, the draw repeatable (seeded)."""
    cfg = cond_config("l2", "train.cond_dropout=0.5", "train.batch_size=64", "data.max_images=200")
    trainer = Trainer(cfg, str(tmp_path), resume=None, progress=False)
    dropped = total = 0
    for step in range(4):
        trainer._data_gen.manual_seed(step)
        y = trainer._labels(step, 0)["class_labels"]
        trainer._data_gen.manual_seed(step)
        assert torch.equal(y, trainer._labels(step, 0)["class_labels"])
        true = trainer.source.labels[trainer.plan.indices(step, 0)]
        kept = y != 10
        assert torch.equal(y[kept], true[kept])
        dropped, total = dropped + int((~kept).sum()), total + y.numel()
    assert abs(dropped / total - 0.5) < 4 * (0.25 / total) ** 0.5


@pytest.mark.parametrize("objective", ["l2", "energy", "dual_sobolev", "l2+dual_sobolev", "asymmetry"])
def test_every_digits_cond_config_builds_a_conditional_model_and_critic(objective):
    """Every configs/digits_cond/ file validates and builds what the driver builds; one joint loss on 4 digits with
    their labels is finite, and without labels the conditional UNet raises (so the labels are what it runs on)."""
    from gradscore_train.build import (
        build_critic,
        build_score_model,
        build_sde,
        check_objective_config,
        objective_from_config,
    )
    from gradscore_train.data import build_source

    cfg = cond_config(objective)
    spec, sde, source = check_objective_config(cfg), build_sde(cfg), build_source(cfg.data)
    model = build_score_model(cfg, sde, source.shape, spec)
    critic = build_critic(cfg, sde, source.shape) if spec.needs_critic else None
    obj = objective_from_config(cfg, sde, critic)
    x0, y = source.images[:4], source.labels[:4]
    assert torch.isfinite(obj(model, x0, class_labels=y)).all()
    with pytest.raises(ValueError, match="class_labels should be provided"):
        obj(model, x0)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["l2", "l2+dual_sobolev"])
def test_the_driver_trains_class_conditionally_on_digits(tmp_path, objective):
    """2 driver steps on configs/digits_cond/ (with a critic for l2+dual_sobolev), then guided samples (w = 1)."""
    out = run(cond_config(objective, "eval.diagnose_every=0", "eval.quality=true",
                          f"eval.classifier_cache={tmp_path / 'cls'}"), str(tmp_path), max_steps=2, progress=False)
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    # the 16 guided samples were drawn for labels 0..9, 0..5: the classifier's verdict on each label
    per_class = [out[f"quality/class_accuracy/{k}"] for k in range(10)]
    assert all(0 <= a <= 1 for a in per_class) and "quality/class_coverage" not in out
    assert out["quality/class_accuracy"] == pytest.approx((sum(per_class[:6]) * 2 + sum(per_class[6:])) / 16)
    assert os.path.isfile(tmp_path / "samples" / "step-0000002.png")


def test_conditional_configs_need_labels_in_range():
    cfg = cond_config("l2")
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ConfigError, match="has no labels.*data.label_column"):
        check_labels(cfg, TensorSource(images, None, name="folder"))
    with pytest.raises(ConfigError, match=r"labels of folder lie in \[0, 12\].*model.num_classes=13"):
        check_labels(cfg, TensorSource(images, torch.tensor([0, 1, 2, 12]), name="folder"))
    with pytest.raises(ConfigError, match="need a class-conditional model"):
        load_config(os.path.join(ROOT, "configs", "digits", "l2.yaml"), ["train.cond_dropout=0.1"])
    with pytest.raises(ConfigError, match="model.num_classes > 0 needs model.kind='unet'"):
        load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), ["model.num_classes=3"])


def test_batch_plan_labels_are_those_of_the_micro_batch_examples():
    """BatchPlan.labels(step, j) = labels[indices(step, j)], across an epoch boundary (10 images, 4 per micro-batch,
    2 micro-batches per step); images without labels and toy sources raise naming the fix."""
    from gradscore.toy import GaussianMixture
    from gradscore_train.data import BatchPlan, DataError, ToySource

    images = torch.linspace(-1, 1, 10)[:, None, None, None].expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10) % 3
    plan = BatchPlan(TensorSource(images, labels), global_batch=8, num_micro=2, seed=0)
    for step in range(3):
        for j in range(2):
            idx = plan.indices(step, j)
            assert torch.equal(plan.labels(step, j), labels[idx])
            assert torch.equal(plan.micro(step, j, torch.Generator())[:, 0, 0, 0], images[idx, 0, 0, 0])
    with pytest.raises(DataError, match="no labels.*data.label_column"):
        BatchPlan(TensorSource(images, None), 8, 2, 0).labels(0, 0)
    with pytest.raises(DataError, match="no labels"):
        BatchPlan(ToySource(GaussianMixture([[0.0, 0.0]])), 8, 2, 0).labels(0, 0)


def test_edm_config_builds_edm_process_model_and_weighting():
    """sde.type=edm with model.output=edm and weighting=edm: the driver builds EDMSDE (its parameters from the config)
    and an EDM-preconditioned ScoreModel whose DSM loss is finite; model.output=edm under a VP process is a config
    error."""
    import gradscore as gs
    from gradscore_train.build import build_score_model, build_sde, check_objective_config, objective_from_config

    edm = ["sde.type=edm", "sde.sigma_min=0.002", "sde.sigma_max=80.0", "sde.sigma_data=0.7", "model.output=edm",
           "objective.hparams.weighting=edm"]
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), edm)
    sde = build_sde(cfg)
    assert isinstance(sde, gs.EDMSDE) and (sde.sigma_min, sde.sigma_max, sde.sigma_data) == (0.002, 80.0, 0.7)
    model = build_score_model(cfg, sde, (2,), check_objective_config(cfg))
    assert model.output == "edm" and model.sigma_data == 0.7
    assert torch.isfinite(objective_from_config(cfg, sde)(model, torch.randn(16, 2))).all()
    with pytest.raises(ConfigError, match="model.output='edm' needs sde.type='edm'"):
        load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), ["model.output=edm"])
