"""Bad inputs (issue 15, item 7): each one clear message naming the problem, raised before any
training work, or, when it happens mid-run, with the work already saved left intact.

The rows of the README's "Reliability" table not tested here are tested where the feature lives: a
wrong type or an unknown key in YAML (tests/test_config.py), NaN/Inf in image tensors and an empty
imagefolder (tests/test_data.py), a non-finite loss (tests/test_train_loop.py), a damaged checkpoint
(tests/test_reliability_checkpoints.py).
"""
from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
import torch

from gradscore_train.checkpoint import CheckpointError, checkpoint_dirs, verify_checkpoint
from gradscore_train.config import ConfigError, DataConfig, load_config
from gradscore_train.data import DataError, build_source
from gradscore_train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.batch_size=16", "model.hidden=16", "model.depth=2", "critic.hidden=16", "critic.depth=2",
        "train.warmup_steps=0", "eval.num_samples=8", "eval.sample_steps=2", "eval.diag_samples=16",
        "eval.diag_times=[0.5]", "eval.quality=false", "train.checkpoint_every=2"]


def toy(objective="l2", *extra):
    return load_config(os.path.join(ROOT, "configs", "toy", f"{objective}.yaml"), TINY + list(extra))


def _png(path, mode, size, value=100):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


# ----------------------------------------------------------------------------- image folders
def test_mixed_size_imagefolder_names_the_file(tmp_path):
    _png(tmp_path / "a" / "0.png", "L", (6, 6))
    _png(tmp_path / "a" / "1.png", "L", (7, 7))
    with pytest.raises(DataError, match=r"image 1 \(.*1\.png\) has shape \(1, 7, 7\), image 0 has \(1, 6, 6\); "
                                        r"set data.resolution"):
        build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path)))


def test_mixed_channel_imagefolder_names_the_file(tmp_path):
    _png(tmp_path / "a" / "0.png", "L", (6, 6))
    _png(tmp_path / "a" / "1.png", "RGB", (6, 6))
    with pytest.raises(DataError, match=r"image 1 \(.*1\.png\) is colour \(3 channels\) but image 0 \(.*0\.png\) is "
                                        r"greyscale \(1 channel\); set data.channels"):
        build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path)))
    # with data.channels every image is converted
    assert build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path), channels=3)).images.shape == (2, 3, 6, 6)


def test_float_image_holding_nan_is_named_not_crushed_to_zero(tmp_path):
    from PIL import Image
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F").save(tmp_path / "a" / "0.tiff")
    bad = np.full((4, 4), 0.5, np.float32)
    bad[1, 2] = np.nan
    Image.fromarray(bad, mode="F").save(tmp_path / "a" / "1.tiff")
    with pytest.raises(DataError, match=r"image 1 \(.*1\.tiff\) holds 1 NaN or Inf pixels"):
        build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path)))


def test_missing_label_column_lists_the_columns():
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import Image

    from gradscore_train.data import images_from_dataset
    ds = Dataset.from_dict({"image": [Image.new("L", (4, 4))] * 2, "y": [0, 1]}).cast_column("image", ImageFeature())
    with pytest.raises(DataError, match=r"data.label_column='label' is not a column; columns are \['image', 'y'\]"):
        images_from_dataset(ds, DataConfig(kind="hf", name="x", label_column="label"), "x")


# ----------------------------------------------------------------------------- runs
def test_data_smaller_than_the_batch(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "digits", "l2.yaml"),
                      ["data.max_images=6", "train.batch_size=8", "model.block_out_channels=[16,32]"])
    with pytest.raises(DataError, match=r"digits: 6 examples, fewer than train.batch_size=8"):
        run(cfg, str(tmp_path / "run"), max_steps=1, progress=False)


def test_unwritable_output_directory_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    with pytest.raises(CheckpointError, match=re.escape(f"output directory {str(out)!r} cannot be written")):
        run(toy(), str(out), max_steps=1, progress=False)


def test_disk_full_while_saving_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    """A simulated ENOSPC in the middle of writing checkpoint 4 (after accelerate's files, at the score
    model's weights): a CheckpointError naming that checkpoint and the intact one; no temporary folder left."""
    import gradscore_train.checkpoint as ck

    real = ck.save_file

    def full_disk(tensors, path, *a, **k):
        if "step-0000004" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-0000004 .*No space left on device.*"
                                              r"intact: .*step-0000002"):
        run(toy(), str(out), max_steps=6, progress=False)
    assert [os.path.basename(c) for c in checkpoint_dirs(str(out))] == ["step-0000002"]
    verify_checkpoint(checkpoint_dirs(str(out))[0])
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002"]


def test_critic_returning_the_wrong_shape_fails_before_training(tmp_path, monkeypatch):
    import gradscore as gs
    import gradscore_train.loop as loop

    monkeypatch.setattr(loop, "build_critic", lambda cfg, sde, shape: gs.Critic(
        gs.TimeMLP(shape[0], hidden=8, depth=1, out_dim=3), sde))
    with pytest.raises(ConfigError, match=r"fail a check before training: the critic backbone .*must return one "
                                          r"scalar per sample, shape \[2\] or \[2, 1\], got \(2, 3\)"):
        run(toy("dual_sobolev"), str(tmp_path / "run"), max_steps=1, progress=False)
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------- checkpoints given to the CLIs
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyrun")
    run(toy(), str(out), max_steps=2, progress=False)
    return out


DIAG = ["--num-data", "64", "--num-times", "2", *TINY]


def _diagnose(capsys, *args):
    from gradscore_train.diagnose import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_diagnose_with_another_runs_config_lists_the_keys(toy_run, tmp_path, capsys):
    """Same network shapes, other process and data: today's weights fit, so only the configs tell."""
    err = _diagnose(capsys, "--config", "configs/toy/l2.yaml", "--checkpoint", str(toy_run),
                    "--out", str(tmp_path), *DIAG, "sde.beta_max=5.0", "data.preset=grid9")
    assert "2 key(s)" in err and "data.preset: 'ring8' -> 'grid9'" in err and "sde.beta_max: 20.0 -> 5.0" in err
    assert os.path.join(str(toy_run), "checkpoints", "step-0000002", "config.yaml") in err


@pytest.mark.parametrize("name", ["trainer_state.json", "score_model.safetensors"])
def test_truncated_checkpoint_file_is_named(toy_run, tmp_path, capsys, name):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dirs(str(toy_run))[-1], ckpt)
    with open(ckpt / name, "r+b") as f:
        f.truncate(10)
    err = _diagnose(capsys, "--config", "configs/toy/l2.yaml", "--checkpoint", str(ckpt), *DIAG)
    assert str(ckpt / name) in err


def test_train_cli_resume_without_intact_checkpoint_is_one_line(toy_run, tmp_path, capsys):
    import shutil

    from gradscore_train.train import main
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    with open(out / "checkpoints" / "step-0000002" / "model.safetensors", "r+b") as f:
        f.truncate(10)
    code = main(["--config", "configs/toy/l2.yaml", "--output-dir", str(out), "--resume", "--no-progress", *TINY,
                 "train.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "no intact checkpoint" in err and "step-0000002" in err and "Traceback" not in err


def test_shapes_check_leaves_the_run_unchanged():
    """The pre-training forward pass draws from its own generator: the global generator is where it was."""
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    from gradscore_train.loop import Trainer
    tr = Trainer(toy(), "/tmp/unused-gradscore-check", None, False)
    del tr
    torch.manual_seed(5)
    assert torch.equal(before, torch.random.get_rng_state())
