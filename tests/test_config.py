"""Config validation: every problem is one ConfigError naming the key/file and what was expected,
raised on load, before any compute."""
from __future__ import annotations

import glob
import os

import pytest

from gradscore_train.build import check_objective_config
from gradscore_train.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


# Training configs only: configs/ablations/ holds ablation grids (validated in test_ablate.py).
TRAINING_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
                          if os.sep + "ablations" + os.sep not in p)


@pytest.mark.parametrize("path", TRAINING_CONFIGS)
def test_shipped_configs_load_and_name_a_registered_objective(path):
    import gradscore

    cfg = load_config(path)
    spec = check_objective_config(cfg)
    stem = os.path.splitext(os.path.basename(path))[0]        # <objective>.yaml, or <objective>_<variant>.yaml
    assert stem == cfg.objective.name or stem.startswith(cfg.objective.name + "_"), (stem, cfg.objective.name)
    assert spec.parametrisation in ("score", "energy")
    assert cfg.objective.name in gradscore.OBJECTIVES


def test_every_objective_has_a_config_in_each_family():
    import gradscore

    for family in ("toy", "digits", "digits_cond", "cifar10"):
        for name in gradscore.OBJECTIVES:
            assert os.path.isfile(os.path.join(ROOT, "configs", family, f"{name}.yaml")), (family, name)


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"'nope/missing.yaml' does not exist"):
        load_config("nope/missing.yaml")


@pytest.mark.parametrize("text,pattern", [
    ("train: {lrr: 0.1}\n", r"unknown key 'train.lrr'; expected one of batch_size, .*lr"),
    ("trian: {lr: 0.1}\n", r"unknown key 'trian'"),
    ("train: {batch_size: 12.5}\n", r"train.batch_size must be an integer, got 12.5"),
    ("train: {lr: fast}\n", r"train.lr must be a number, got 'fast'"),
    ("train: {clip_grad: [1]}\n", r"train.clip_grad must be a number or null"),
    ("sde: {type: vpp}\n", r"sde.type must be one of 'vp', 've'"),
    ("model: {block_out_channels: [32, x]}\n", r"model.block_out_channels\[1\] must be an integer"),
    ("train: 3\n", r"train must be a mapping"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("train: {lr: -1.0}\n", r"train.lr must be > 0"),
    ("data: {kind: imagefolder}\n", r"data.data_dir is required"),
    ("data: {kind: imagefolder, data_dir: /no/such/dir}\nmodel: {kind: unet}\n",
     r"data.data_dir '/no/such/dir' is not a directory"),
    ("data: {kind: digits}\n", r"model.kind='mlp' needs toy data"),
])
def test_bad_files_fail_with_key_and_expectation(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert path in str(info.value)


def test_overrides_are_typed_like_the_file():
    cfg = load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"),
                      ["train.lr=1e-3", "train.max_steps=7", "data.preset=grid9", "eval.diag_times=[0.1, 0.3]",
                       "train.clip_grad=null", "train.mixed_precision=no", "objective.hparams.weighting=likelihood"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.data.preset == "grid9" and cfg.eval.diag_times == [0.1, 0.3]
    assert cfg.train.clip_grad is None and cfg.train.mixed_precision == "no"
    assert cfg.objective.hparams == {"weighting": "likelihood"}


@pytest.mark.parametrize("override,pattern", [
    ("train.lrr=1", r"unknown key 'train.lrr'"),
    ("train.max_steps=ten", r"train.max_steps must be an integer, got 'ten'"),
    ("train.lr", r"must look like section.key=value"),
    ("train.batch_size.x=1", r"'batch_size' is not a section"),
    ("eval.diag_solenoidal_points=0", r"eval.diag_solenoidal_points must be a positive number of points"),
])
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), [override])


def test_objective_hparams_checked_against_the_registry():
    base = os.path.join(ROOT, "configs", "toy", "l2.yaml")
    with pytest.raises(ConfigError, match=r"objective.hparams.n_critic is not a hyperparameter of 'l2'"):
        check_objective_config(load_config(base, ["objective.hparams.n_critic=2"]))
    with pytest.raises(ConfigError, match=r"objective.name='l3' is not a known objective"):
        check_objective_config(load_config(base, ["objective.name=l3"]))
    with pytest.raises(ConfigError, match=r"n_critic must be int"):
        check_objective_config(load_config(os.path.join(ROOT, "configs", "toy", "dual_sobolev.yaml"),
                                           ["objective.hparams.n_critic=two"]))


def test_yaml_12_scalars_and_section_merging(tmp_path):
    """Values are read with YAML 1.2 rules: a bare ``no`` is the string 'no' (YAML 1.1 would make it
    False, which is not one of mixed_precision's choices), ``1e-3`` is a float even inside a free-form
    mapping (YAML 1.1 reads it as a string); a section given as a mapping merges into the file's."""
    path = write(tmp_path, "train: {mixed_precision: no, lr: 1e-3, max_steps: 9}\n"
                           "objective: {name: l2+dual_sobolev, hparams: {l2_weight: 5e-1}}\n")
    cfg = load_config(path, ["train={lr: 2e-3}"])
    assert cfg.train.mixed_precision == "no" and cfg.train.lr == 2e-3 and cfg.train.max_steps == 9
    assert cfg.objective.hparams == {"l2_weight": 0.5} and isinstance(cfg.objective.hparams["l2_weight"], float)
    assert cfg.source == path


def test_objective_hparams_errors_name_the_config_file():
    """The library's validation (OBJECTIVES[name].validate) decides; the driver's ConfigError names the file."""
    path = os.path.join(ROOT, "configs", "toy", "dual_sobolev.yaml")
    for override, pattern in [("objective.hparams.n_critic=0", r"objective.hparams: .*n_critic must be int >= 1"),
                              ("objective.hparams.weighting=sigma", r"objective.hparams: .*weighting must be one of"),
                              ("objective.hparams.probes=2", r"objective.hparams.probes is not a hyperparameter")]:
        with pytest.raises(ConfigError, match=pattern) as info:
            check_objective_config(load_config(path, [override]))
        assert path in str(info.value)
