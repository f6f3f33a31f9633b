"""The processes of a multi-process run stop together: a failing rank is reported, the others stop.

A rank that raises blocks every other rank in its next collective (a DDP all-reduce, a barrier) until
the backend's timeout (30 minutes by default). ``RankGuard`` turns that into a bounded stop: a rank
whose training raises writes ``"rank R failed at step S: <error>"`` under one key of the process
group's key-value store (``report_failure``), and every rank runs a daemon thread that polls that key
(every ``interval`` seconds) and, once another rank has written it, logs
``"stopping rank Q: rank R failed at step S: ..."`` and ends its process with exit code 1 (the main
thread may be inside a collective that cannot be interrupted). The failing rank waits (at most
``grace`` seconds) for the others to acknowledge before it exits, since the launcher ends every
process once one has exited. A rank killed outright writes nothing:
gloo then fails the peers' pending collectives ("Connection closed by peer"), which they report in
turn, and the launcher (torchrun, under ``accelerate launch``) names the killed rank and its signal.

``check_world_size`` refuses a process that the launcher started as one of N while accelerate sees a
run of one (two independent one-process runs writing into one folder). docs/engineering.md,
"accelerate on CPU", has how that happens.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

__all__ = ["RankGuard", "check_world_size", "start_guard", "stop_guard", "report_failure", "set_step",
           "FAILURE_KEY"]

log = logging.getLogger(__name__)

FAILURE_KEY = "gradscore/failed_rank"
STOPPED_KEY = "gradscore/stopped_ranks"          # how many other ranks have seen the report and stop


def check_world_size(num_processes: int, environ=None) -> None:
    """Raise ``RuntimeError`` naming both numbers when the launcher's ``WORLD_SIZE`` is not the number of
    processes accelerate sees (``num_processes``)."""
    environ = os.environ if environ is None else environ
    launched = environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate sees "
            f"{num_processes}; these would be {launched} independent runs writing into one folder. On CPU use "
            "`accelerate launch --multi_gpu --num_processes N ...` with ACCELERATE_USE_CPU=1 or "
            "Accelerator(cpu=True) (docs/engineering.md, 'accelerate on CPU')")


class RankGuard:
    """Failure reports through the store ``store`` (a ``torch.distributed.Store``) of a run of
    ``world_size`` processes, seen from rank ``rank``; ``start()`` begins the polling thread."""

    def __init__(self, store, rank: int, world_size: int, interval: float = 0.5, grace: float = 5.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval, self.grace = interval, grace
        self.step: int | None = None           # the step being trained (1-based), None during setup
        self.failing = False                   # this rank is reporting its own failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gradscore-rank-guard", daemon=True)

    def start(self) -> RankGuard:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def where(self) -> str:
        return "during setup" if self.step is None else f"at step {self.step}"

    def report(self, exc: BaseException) -> str:
        """Write this rank's failure (``exc``) to the store; returns the message."""
        self.failing = True
        msg = f"rank {self.rank} failed {self.where()}: {type(exc).__name__}: {str(exc)[:500]}"
        try:
            if self.store.check([FAILURE_KEY]):              # another rank failed first: keep its report
                self.store.add(STOPPED_KEY, 1)
                return msg
            self.store.set(FAILURE_KEY, msg)
            # wait (at most `grace` seconds) until the others have seen it: the launcher ends them all as soon
            # as this process exits, and they should say why they stop
            deadline = time.monotonic() + self.grace
            while self.store.add(STOPPED_KEY, 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception as e:   # the store may be gone already; the launcher still sees this rank's exit
            log.warning("could not report the failure to the other ranks: %s", e)
        return msg

    def _watch(self) -> None:
        lost_since = None
        while not self._stop.wait(self.interval):
            try:
                found = self.store.check([FAILURE_KEY])
                lost_since = None
            except Exception as e:   # the store's host is gone: a failure unless the run is ending
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since < self.grace:
                    continue
                self._exit(f"lost contact with the run's store ({type(e).__name__}: {e}) {self.where()}")
                return
            if found and not self.failing:
                self._exit(self.store.get(FAILURE_KEY).decode())
                return

    def _exit(self, why: str) -> None:
        if self._stop.is_set() or self.failing:
            return
        print(f"stopping rank {self.rank} {self.where()}: {why}", file=sys.stderr, flush=True)
        try:
            self.store.add(STOPPED_KEY, 1)
        except Exception:   # the store is gone: nobody waits for this acknowledgement
            pass
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)


_guard: RankGuard | None = None


def start_guard(num_processes: int, rank: int) -> RankGuard | None:
    """Start this process's guard when the run has several processes (the default process group's store)."""
    global _guard
    if num_processes < 2:
        return None
    from torch.distributed import distributed_c10d

    stop_guard()
    _guard = RankGuard(distributed_c10d._get_default_store(), rank, num_processes).start()
    return _guard


def stop_guard() -> None:
    global _guard
    if _guard is not None:
        _guard.stop()
        _guard = None


def set_step(step: int) -> None:
    """The step this rank is training (1-based), for the failure messages."""
    if _guard is not None:
        _guard.step = step


def report_failure(exc: BaseException) -> str | None:
    """Report ``exc`` to the other ranks (if a guard runs); returns the message, logged on this rank."""
    if _guard is None:
        return None
    msg = _guard.report(exc)
    print(msg, file=sys.stderr, flush=True)
    return msg
