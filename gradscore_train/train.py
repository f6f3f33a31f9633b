"""Train a score model from a YAML config.

    python -m gradscore_train.train --config configs/toy/l2.yaml train.lr=1e-3 --output-dir runs/toy-l2
    accelerate launch -m gradscore_train.train --config configs/toy/l2.yaml [key=value ...]
    gradscore-train --config configs/toy/l2.yaml            (the console script, same options)

Options: ``--output-dir`` (default ``runs/<config folder>-<config name>``), ``--max-steps``,
``--resume`` (the latest checkpoint of the output dir, or a given checkpoint folder),
``--allow-config-change`` (a resumed run may change the keys of ``config.RESUMABLE_CHANGES``),
``--no-progress``. Everything else lives in the config (gradscore_train/config.py).

A process of a multi-process run ends through ``exit_without_finalization`` (see there why).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn

from .config import ConfigError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a gradscore score model (see configs/).")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/toy/l2.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3 data.preset=grid9")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<config folder>-<config name>)")
    p.add_argument("--max-steps", type=int, default=None, help="total optimizer steps (overrides train.max_steps)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest intact checkpoint in --output-dir, or from the given checkpoint "
                        "folder; --resume auto: the same, or a fresh start when --output-dir has no checkpoints")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume with changed length, checkpoint, logging or eval keys (never model, objective, data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def exit_without_finalization(code: int) -> NoReturn:
    """End this process now with ``code``, after flushing logging and the standard streams, skipping the
    interpreter's finalization. For the processes of a multi-process (gloo) run, after their last collective.

    Why: when the main thread is done, a gloo worker thread may still be releasing the last collective's
    work, which holds tensors owned by Python objects. Once the interpreter finalizes, that thread's attempt
    to take the GIL exits it inside the C++ destructor and the process aborts with "terminate called without
    an active exception" (SIGABRT; seen in gdb on a core dump, pytorch/pytorch#190489), so ``accelerate
    launch`` reports a failed run after a complete one (CHANGELOG.md, Unreleased, has how often).
    ``destroy_process_group`` does not prevent it: once ``torch._dynamo`` is imported (accelerate and DDP
    import it), a reference to the process group outlives it, and so do its worker threads. Files written
    by the run are closed by then (checkpoints, ``metrics.jsonl``, TensorBoard)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    """The command line; returns the exit code (0, 2 for a config, data or checkpoint error, 3 for a non-finite loss).
    In a multi-process run the process ends here instead (``exit_without_finalization``)."""
    try:
        code = _main(argv)
    except BaseException:
        if _distributed():     # the error was reported to the other ranks (ranks.py); end now, without hanging
            traceback.print_exc()
            exit_without_finalization(1)
        raise
    if _distributed():
        exit_without_finalization(code)
    return code


def _distributed() -> bool:
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate", "matplotlib", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.max_steps is not None and args.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    family = os.path.basename(os.path.dirname(os.path.abspath(args.config)))
    out = args.output_dir or os.path.join("runs", f"{family}-{os.path.splitext(os.path.basename(args.config))[0]}")
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import NonFiniteLoss, run
    try:
        metrics = run(cfg, out, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress,
                      allow_config_change=args.allow_config_change)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    from accelerate import PartialState
    if not PartialState().is_main_process:
        return 0
    shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items() if "_stderr" not in k}
    print(f"final metrics ({out}): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
