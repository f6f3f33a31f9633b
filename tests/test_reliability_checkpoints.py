"""Damaged and foreign checkpoints (issue 15, item 2).

* A truncated or corrupted newest checkpoint: ``--resume`` falls back to the newest intact one with a
  warning naming the damaged folder, which stays on disk (moved aside to ``step-*.damaged`` when the run
  writes that step again). Oracle for the fallback: the run resumed from the older checkpoint ends with
  the weights of an uninterrupted run, bitwise (every random draw is a function of (seed, step)).
* Resuming with a config that changes the model, objective or data: one ``ConfigError`` listing every
  differing key; the safe keys (``config.RESUMABLE_CHANGES``) only with ``allow_config_change``.
* Nothing in a checkpoint is unpickled: a pickle that would create a marker file when unpickled, put
  in place of the random states and of the optimizer state, never runs.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil

import pytest
from safetensors.torch import load_file

from gradscore_train.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    latest_intact_checkpoint,
    read_step,
    verify_checkpoint,
)
from gradscore_train.config import ConfigError, check_resume_config, load_config
from gradscore_train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.batch_size=16", "model.hidden=16", "model.depth=2", "train.warmup_steps=0", "train.log_every=1",
        "eval.num_samples=8", "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]",
        "eval.quality=false", "train.checkpoint_every=2", "train.keep_checkpoints=5"]


def toy(*extra):
    return load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), TINY + list(extra))


def _weights(ckpt):
    return {**load_file(os.path.join(ckpt, "score_model.safetensors")),
            **{f"ema.{k}": v for k, v in load_file(os.path.join(ckpt, "ema.safetensors")).items()}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("runs")
    run(toy(), str(root / "four"), max_steps=4, progress=False)
    run(toy(), str(root / "six"), max_steps=6, progress=False)
    return root


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "truncated weights": lambda c: _truncate(os.path.join(c, "model.safetensors")),
    "corrupted optimizer": lambda c: _flip_byte(os.path.join(c, "optimizer.bin")),
    "corrupted EMA": lambda c: _flip_byte(os.path.join(c, "ema.safetensors")),
    "truncated trainer_state.json": lambda c: _truncate(os.path.join(c, "trainer_state.json")),
    "missing trainer_state.json": lambda c: os.remove(os.path.join(c, "trainer_state.json")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damage_is_detected_and_skipped_with_a_warning(trained, tmp_path, caplog, damage):
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    bad = out / "checkpoints" / "step-0000004"
    DAMAGE[damage](bad)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        verify_checkpoint(str(bad))
    with caplog.at_level(logging.WARNING, logger="gradscore_train.checkpoint"):
        assert latest_intact_checkpoint(str(out)).endswith("step-0000002")
    assert any("skipping damaged checkpoint" in r.message and str(bad) in r.message for r in caplog.records)
    assert sorted(os.listdir(bad)) == sorted(n for n in os.listdir(trained / "four" / "checkpoints" / "step-0000004")
                                             if damage != "missing trainer_state.json" or n != "trainer_state.json")


@pytest.mark.parametrize("damage", ["truncated weights", "corrupted optimizer"])
def test_damaged_latest_checkpoint_falls_back_warns_and_is_kept(trained, tmp_path, caplog, damage):
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    bad = out / "checkpoints" / "step-0000004"
    DAMAGE[damage](bad)
    with caplog.at_level(logging.WARNING, logger="gradscore_train.checkpoint"):
        metrics = run(toy(), str(out), max_steps=6, resume="latest", progress=False)
    assert any("skipping damaged checkpoint" in r.message and str(bad) in r.message for r in caplog.records)
    assert metrics["step"] == 6
    # resumed from step 2: steps 3-6 are the uninterrupted run's (bitwise: same data, noise and state)
    final, reference = _weights(out / "checkpoints" / "step-0000006"), _weights(trained / "six" / "checkpoints" /
                                                                                  "step-0000006")
    assert all((final[k] == reference[k]).all() for k in reference)
    # the damaged folder was never deleted: re-writing step 4 moved it aside, as it was
    kept = out / "checkpoints" / "step-0000004.damaged"
    assert kept.is_dir() and sorted(os.listdir(kept)) == sorted(os.listdir(trained / "four" / "checkpoints" /
                                                                            "step-0000004"))
    with pytest.raises(CheckpointError):
        verify_checkpoint(str(kept))                                    # as damaged as it was
    verify_checkpoint(str(out / "checkpoints" / "step-0000004"))        # the new step 4 is intact


def test_no_intact_checkpoint_is_one_error_naming_them(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    for c in checkpoint_dirs(str(out)):
        _truncate(os.path.join(c, "score_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*2 damaged: .*step-0000002, .*step-0000004"):
        run(toy(), str(out), max_steps=6, resume="latest", progress=False)
    assert len(checkpoint_dirs(str(out))) == 2                          # nothing deleted


def test_resume_with_another_model_objective_or_data_lists_every_key(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    with pytest.raises(ConfigError) as e:
        run(toy("model.hidden=32", "data.preset=grid9", "objective.name=energy"), str(out), max_steps=6,
            resume="latest", progress=False)
    msg = str(e.value)
    assert "3 key(s)" in msg and str(out / "checkpoints" / "step-0000004" / "config.yaml") in msg
    for key in ("model.hidden: 16 -> 32", "data.preset: 'ring8' -> 'grid9'", "objective.name: 'l2' -> 'energy'"):
        assert key in msg
    with pytest.raises(ConfigError, match=r"cannot resume.*objective.name.*\n?.*"):   # even with the flag
        run(toy("objective.name=energy"), str(out), max_steps=6, resume="latest", progress=False,
            allow_config_change=True)
    # a safe key: refused without the flag (naming it), accepted with it; --max-steps is itself explicit
    with pytest.raises(ConfigError, match=r"train.log_every: 1 -> 2 \(safe to change: pass --allow-config-change"):
        run(toy("train.log_every=2"), str(out), max_steps=6, resume="latest", progress=False)
    assert run(toy("train.log_every=2"), str(out), max_steps=5, resume="latest", progress=False,
               allow_config_change=True)["step"] == 5


def test_resume_config_rules():
    saved = {"train": {"max_steps": 4, "lr": 1e-3, "log_every": 1}, "eval": {"num_samples": 8}, "source": "a.yaml"}
    same = {**saved, "source": "b.yaml"}                                 # where it was read from is no change
    assert check_resume_config(saved, same, "x") == {}
    longer = {**saved, "train": {**saved["train"], "max_steps": 8}}
    with pytest.raises(ConfigError, match=r"train.max_steps: 4 -> 8 .*or --max-steps"):
        check_resume_config(saved, longer, "x")
    assert check_resume_config(saved, longer, "x", allow_max_steps=True) == {"train.max_steps": (4, 8)}
    # a checkpoint written before a key existed: the key takes the schema's default, so it is no change
    from gradscore_train.config import Config, config_to_dict
    full = config_to_dict(Config())
    older = {**full, "eval": {k: v for k, v in full["eval"].items() if k != "budget"},
             "data": {k: v for k, v in full["data"].items() if k != "in_memory"}}
    assert check_resume_config(older, full, "x") == {}
    faster = {**saved, "train": {**saved["train"], "lr": 2e-3}}
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.002 \(these change"):
        check_resume_config(saved, faster, "x", allow_changes=True, allow_max_steps=True)


class _Marker:
    """Unpickling this object creates the file ``path`` (what a malicious pickle could do instead)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reseal(ckpt):
    """Record the files' current sizes and digests, as a forger would, so only the format protects."""
    from gradscore_train.checkpoint import STATE, _manifest
    state = json.load(open(os.path.join(ckpt, STATE)))
    state["files"] = _manifest(ckpt)
    json.dump(state, open(os.path.join(ckpt, STATE), "w"))


def test_loading_a_checkpoint_never_unpickles(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    ckpt = out / "checkpoints" / "step-0000004"
    marker = tmp_path / "unpickled"
    for name in os.listdir(ckpt):
        if name.endswith(".pkl"):                                       # accelerate's random states
            with open(ckpt / name, "wb") as f:
                pickle.dump(_Marker(str(marker)), f)
    _reseal(str(ckpt))
    assert run(toy(), str(out), max_steps=5, resume="latest", progress=False)["step"] == 5
    assert not marker.exists()
    ckpt = out / "checkpoints" / "step-0000005"
    with open(ckpt / "optimizer.bin", "wb") as f:
        pickle.dump(_Marker(str(marker)), f)
    _reseal(str(ckpt))
    with pytest.raises(CheckpointError, match=r"optimizer.bin could not be read with weights_only=True"):
        run(toy(), str(out), max_steps=6, resume="latest", progress=False)
    assert not marker.exists()


def test_driver_loads_files_only_as_safetensors_or_weights_only():
    """Static check of the driver's sources: every torch.load passes weights_only=True, and neither
    accelerate's load_state (it unpickles random states and custom objects) nor pickle is used."""
    pkg = os.path.join(ROOT, "gradscore_train")
    for folder, _, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                src = open(os.path.join(folder, name)).read()
                for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
                    assert "weights_only=True" in m.group(1), f"{name}: {m.group(0)}"
                assert "load_state(" not in src.replace("load_state_dict(", ""), name
                assert not re.search(r"^\s*import pickle|pickle\.load", src, re.M), name


def test_resume_auto_starts_a_fresh_folder_and_continues_one_with_checkpoints(trained, tmp_path):
    assert run(toy(), str(tmp_path / "fresh"), max_steps=2, resume="auto", progress=False)["step"] == 2
    with pytest.raises(CheckpointError, match=r"no intact checkpoint"):
        run(toy(), str(tmp_path / "empty"), max_steps=2, resume="latest", progress=False)
    out = tmp_path / "run"
    shutil.copytree(trained / "four", out)
    assert run(toy(), str(out), max_steps=5, resume="auto", progress=False)["step"] == 5
    assert read_step(latest_intact_checkpoint(str(out))) == 5
