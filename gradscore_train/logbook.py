"""Metrics to ``metrics.jsonl`` and TensorBoard (main process only)."""
from __future__ import annotations

import json
import math
import os

__all__ = ["Logbook"]


class Logbook:
    """``log(step, {name: number})`` appends one JSON line and writes TensorBoard scalars;
    ``image(step, tag, path)`` adds a saved PNG to TensorBoard. Disabled on non-main ranks."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:   # tensorboard is a dependency, but keep training without it
                self._tb = None

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                                for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def image(self, step: int, tag: str, path: str):
        if not self.enabled or self._tb is None:
            return
        import matplotlib.image as mpimg
        import numpy as np

        img = mpimg.imread(path)
        if img.ndim == 3:
            img = img[..., :3]
        self._tb.add_image(tag, np.asarray(img), step, dataformats="HWC" if img.ndim == 3 else "HW")
        self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
