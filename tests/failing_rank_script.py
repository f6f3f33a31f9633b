"""Helper for tests/test_reliability_ranks.py, run under ``accelerate launch --multi_gpu --num_processes 2``:
the training CLI, with rank ``FAIL_RANK`` raising ``RuntimeError("injected failure")`` in the first phase
of step ``FAIL_STEP`` (before its backward, so the other rank waits in the gradient all-reduce).

``FAIL_HANG=1``: the failing process then does not exit (its exit sleeps instead, as a process stuck in
interpreter finalization would), so the launcher cannot notice it; the other rank must stop by itself.
``FAIL_KILL=1``: the failing rank is killed (SIGKILL) instead.
``NO_GUARD=1`` runs without the failure guard (gradscore_train.ranks), to measure what it changes."""
import os
import signal
import sys
import time

from gradscore_train import loop, train

FAIL_RANK, FAIL_STEP = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"])
real = loop.Trainer._phase


def failing_phase(self, step, key, phase, unwrapped):
    if self.acc.process_index == FAIL_RANK and step + 1 == FAIL_STEP:
        if os.environ.get("FAIL_KILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("FAIL_HANG"):
            train.exit_without_finalization = lambda code: time.sleep(3600)
        raise RuntimeError("injected failure")
    return real(self, step, key, phase, unwrapped)


loop.Trainer._phase = failing_phase
if os.environ.get("NO_GUARD"):
    loop.start_guard = lambda *args: None
sys.exit(train.main(sys.argv[1:]))
