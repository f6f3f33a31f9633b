"""Crash-safe checkpoints: ``save_state`` into a temporary folder, then an atomic rename.

Layout of ``<output_dir>/checkpoints/step-000100/``: accelerate's state (model, optimizer,
random states of every rank, the EMA), ``score_model.safetensors`` and ``ema.safetensors``
(the score model's weights), ``trainer_state.json`` (``{"step": 100}``) and ``config.yaml``.
A folder becomes ``step-*`` only once complete, so a crash mid-write leaves the previous
checkpoints as they were; the last ``keep`` are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import yaml
from safetensors.torch import save_file

__all__ = ["checkpoint_dirs", "latest_checkpoint", "save_checkpoint", "read_step", "resolve_checkpoint"]

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _NAME.match(n))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from either itself or a run's output folder (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint (no trainer_state.json) "
                                "nor a run folder with checkpoints/step-*")
    return latest


def read_step(ckpt: str) -> int:
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return int(json.load(f)["step"])


def _state_dict_cpu(module):
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(accelerator, output_dir: str, step: int, score_model, ema, config_dict: dict, keep: int) -> str:
    """Write checkpoint ``step`` on every rank (``save_state`` is collective), rename atomically, prune."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)                 # before any rank writes its random state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()      # every rank has written its files into tmp before it is renamed
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(score_model)
        save_file(_state_dict_cpu(model), os.path.join(tmp, "score_model.safetensors"))
        if ema is not None:
            shadow = {k: v.contiguous() for k, v in ema.state_dict()["shadow"].items()}
            save_file(shadow, os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):                       # re-saving a step (e.g. the final one): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
