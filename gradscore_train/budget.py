"""The time budget of a run's evaluation: sizes that fit a fraction of the training time.

An evaluation after ``T`` seconds of training (since the previous evaluation) may take about
``B = max(eval.budget * T, eval.min_seconds)`` seconds. Its costs are linear in its sizes: sampling
``n`` samples with ``k`` reverse-SDE steps costs ``c_s n k`` and a diagnostic on ``m`` points costs
``c_d m``, with per-unit costs ``c_s``, ``c_d`` measured on a small pilot. ``fit_samples`` and
``fit_points`` return the largest sizes, at most the configured ones, whose predicted cost fits the
seconds they are given: fewer samples first (down to ``min_samples``), then fewer steps (down to
``min_steps``); fewer diagnostic points (down to ``min_points``). ``eval.budget: null`` turns this
off (the configured sizes exactly, reproducible metrics). Sizes follow measured wall time, so with a
budget the sizes, and the metrics' sampling noise, can differ between two runs of one config.
"""
from __future__ import annotations

import math
import time

__all__ = ["EvalBudget", "fit_samples", "fit_points"]


def fit_samples(n: int, steps: int, cost: float, seconds: float, min_samples: int = 64,
                min_steps: int = 20) -> tuple[int, int]:
    """``(samples, steps)`` with ``samples * steps * cost <= seconds`` where the minimums allow it.

    Args:
        n, steps: the configured number of samples and of sampler steps.
        cost: seconds per sample per step.
        seconds: the time given to sampling.
    """
    if n * steps * cost <= seconds:
        return n, steps
    fit_n = math.floor(seconds / (steps * cost))
    if fit_n >= min(n, min_samples):
        return fit_n, steps
    n = min(n, min_samples)
    return n, max(min(steps, min_steps), min(steps, math.floor(seconds / (n * cost))))


def fit_points(points: int, calls: int, cost: float, seconds: float, min_points: int = 128) -> int:
    """Points per diagnostic call, at most ``points``, so that ``calls`` calls at ``cost`` seconds per
    point take at most ``seconds`` (but never fewer than ``min(points, min_points)``)."""
    fit = math.floor(seconds / (calls * cost)) if calls and cost > 0 else points
    return max(min(points, min_points), min(points, fit))


class EvalBudget:
    """The seconds an evaluation may take (``None``: unlimited), counted from construction.

    ``EvalBudget.after_training(train_seconds, fraction, min_seconds)`` is
    ``max(fraction * train_seconds, min_seconds)``, or unlimited for ``fraction=None``."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    @classmethod
    def after_training(cls, train_seconds: float, fraction: float | None, min_seconds: float) -> EvalBudget:
        return cls(None if fraction is None else max(fraction * train_seconds, min_seconds))

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return math.inf if self.seconds is None else max(0.0, self.seconds - self.elapsed())
