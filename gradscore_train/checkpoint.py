"""Crash-safe checkpoints: ``save_state`` into a temporary folder, then an atomic rename; verified reads.

Layout of ``<output_dir>/checkpoints/step-000100/``: accelerate's state (``model.safetensors``,
``model_1.safetensors`` for a critic, ``optimizer.bin``, random states of every rank),
``score_model.safetensors`` and ``ema.safetensors`` (the score model's weights and their EMA),
``config.yaml`` and, written last, ``trainer_state.json``: ``{"step": 100, "ema": {...},
"files": {name: {"bytes": n, "sha256": h}}}``. A folder becomes ``step-*`` only once complete, so a
crash mid-write leaves the previous checkpoints as they were; the last ``keep`` are kept.

Reading: ``verify_checkpoint`` checks every file against the sizes and SHA-256 digests recorded at save
time (and that every safetensors header parses), ``latest_intact_checkpoint`` skips a damaged newest
checkpoint with a warning naming it (and never deletes it), and ``load_checkpoint`` restores model,
critic, optimizer and EMA from safetensors and ``torch.load(weights_only=True)`` only: no pickle in a
checkpoint is unpickled (accelerate's ``load_state`` would unpickle the random states and custom
objects; the loop needs neither, as every random draw is reseeded from ``(seed, step)``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "checkpoint_dirs", "latest_checkpoint", "latest_intact_checkpoint", "save_checkpoint",
           "read_step", "read_trainer_state", "resolve_checkpoint", "verify_checkpoint", "load_checkpoint",
           "read_safetensors"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the folder or file."""


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n)) for n in os.listdir(root) if (m := _NAME.match(n))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest ``step-*`` folder (not verified; see ``latest_intact_checkpoint``)."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def latest_intact_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that passes ``verify_checkpoint``; a damaged newer one is skipped with a
    warning naming it and what is wrong, and left on disk as it is."""
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint %s (left as it is): %s", ckpt, e)
    return None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from either itself or a run's output folder (its latest intact checkpoint)."""
    if os.path.isfile(os.path.join(path, STATE)):
        return path
    latest = latest_intact_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint (no {STATE}) "
                                "nor a run folder with an intact checkpoints/step-*")
    return latest


def read_trainer_state(ckpt: str) -> dict:
    """``trainer_state.json`` of ``ckpt``; a ``CheckpointError`` naming the file if it is missing,
    truncated or has no integer ``step``."""
    path = os.path.join(ckpt, STATE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (the checkpoint was not completed)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} has no integer 'step' (got {state!r:.200})")
    return state


def read_step(ckpt: str) -> int:
    return read_trainer_state(ckpt)["step"]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: str) -> dict:
    return {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": _sha256(os.path.join(folder, n))}
            for n in sorted(os.listdir(folder)) if n != STATE and os.path.isfile(os.path.join(folder, n))}


def verify_checkpoint(ckpt: str) -> dict:
    """Check ``ckpt`` and return its trainer state: ``trainer_state.json`` readable, every file it lists
    present with the recorded size and SHA-256, every ``*.safetensors`` header readable. Raises
    ``CheckpointError`` naming the file."""
    state = read_trainer_state(ckpt)
    for name, rec in state.get("files", {}).items():
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, {rec['bytes']} were written (truncated?)")
        if _sha256(path) != rec["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded when it was written (corrupted)")
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(ckpt, name), "pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{os.path.join(ckpt, name)} is not a readable safetensors file: {e}") from None
    return state


def read_safetensors(path: str, device="cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a ``CheckpointError`` naming the file when it is missing or
    unreadable (truncated, not safetensors) instead of a bare traceback."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def _state_dict_cpu(module):
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(accelerator, output_dir: str, step: int, score_model, ema, config_dict: dict, keep: int) -> str:
    """Write checkpoint ``step`` on every rank (``save_state`` is collective), rename atomically, prune.

    A failed write (disk full, permissions) removes the temporary folder and raises ``CheckpointError``
    naming the checkpoint; the checkpoints already on disk are untouched. A damaged ``step-*`` folder of
    the same step is moved aside to ``step-*.damaged`` instead of being replaced."""
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)                 # before any rank writes its random state into it
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({e}); the earlier checkpoints are intact: "
                              f"{checkpoint_dirs(output_dir)[-1:] or 'none'}") from e
    accelerator.wait_for_everyone()      # every rank has written its files into tmp before it is renamed
    if accelerator.is_main_process:
        try:
            _finish(accelerator, tmp, step, score_model, ema, config_dict)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({e}); the earlier checkpoints are intact: "
                                  f"{checkpoint_dirs(output_dir)[-1:] or 'none'}") from e
        if os.path.isdir(final):                       # re-saving a step (e.g. the final one)
            try:
                verify_checkpoint(final)
                shutil.rmtree(final)
            except CheckpointError as e:
                log.warning("moving damaged checkpoint %s to %s.damaged: %s", final, final, e)
                os.replace(final, f"{final}.damaged")
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _finish(accelerator, tmp: str, step: int, score_model, ema, config_dict: dict) -> None:
    model = accelerator.unwrap_model(score_model)
    save_file(_state_dict_cpu(model), os.path.join(tmp, "score_model.safetensors"))
    state = {"step": step}
    if ema is not None:
        ema_state = ema.state_dict()
        save_file({k: v.contiguous() for k, v in ema_state["shadow"].items()}, os.path.join(tmp, "ema.safetensors"))
        state["ema"] = {"decay": ema_state["decay"], "num_updates": ema_state["num_updates"]}
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        yaml.safe_dump(config_dict, f, sort_keys=False)
    state["files"] = _manifest(tmp)
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(accelerator, ckpt: str, models, optimizer, ema=None) -> int:
    """Restore ``models`` (the prepared score model, then the critic if any: accelerate's
    ``model.safetensors``, ``model_1.safetensors``), ``optimizer`` (``optimizer.bin`` with
    ``weights_only=True``) and ``ema`` (``ema.safetensors`` and the trainer state) from ``ckpt``, which
    is verified first. Returns its step. Raises ``CheckpointError`` naming the file."""
    state = verify_checkpoint(ckpt)
    for i, model in enumerate(models):
        name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
        weights = read_safetensors(os.path.join(ckpt, name))
        try:
            accelerator.unwrap_model(model).load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(f"{os.path.join(ckpt, name)} does not fit the model: "
                                  f"{' '.join(str(e).split())[:300]}") from None
    path = os.path.join(ckpt, "optimizer.bin")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        opt_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises UnpicklingError, RuntimeError or EOFError for a bad file
        raise CheckpointError(f"{path} could not be read with weights_only=True: {type(e).__name__}: {e}") from None
    optimizer.load_state_dict(opt_state)
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(f"{os.path.join(ckpt, STATE)} has no EMA state")
        shadow = read_safetensors(os.path.join(ckpt, "ema.safetensors"))
        ema.load_state_dict({**state["ema"], "shadow": shadow})
    return state["step"]
