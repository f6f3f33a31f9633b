"""Data larger than memory (issue 15, item 4): a ``datasets`` image set read memory-mapped and decoded per
micro-batch (``data.in_memory=false``, ``gradscore_train.data.ArrowSource``).

Oracles: (1) the memory-mapped source yields bitwise the batches of the in-memory one for every
``BatchPlan`` index (same decoding, same (seed, step) order), so training and resume are unchanged;
(2) the peak RSS of a training process on 20,000 generated 3x32x32 images is within 10% of the same
run on 2,000 (decoded into memory, the 18,000 extra images alone would be 221 MB of float32, against
a process of ~0.5-0.7 GB).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradscore_train.config import DataConfig
from gradscore_train.data import ArrowSource, BatchPlan, TensorSource, build_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_dataset(path, n, size=32, seed=0):
    """``n`` random RGB images (PNG in Arrow) with labels, written by save_to_disk."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)

    def rows():
        for i in range(n):
            yield {"image": PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "label": i % 10}

    Dataset.from_generator(rows, features=Features({"image": Image(), "label": Value("int64")}),
                           cache_dir=str(path) + "-cache").save_to_disk(str(path))


def test_memory_mapped_batches_equal_in_memory_ones(tmp_path):
    _write_dataset(tmp_path / "ds", 50, size=8)
    streamed = build_source(DataConfig(kind="hf", data_dir=str(tmp_path / "ds"), in_memory=False, random_flip=True))
    loaded = build_source(DataConfig(kind="hf", data_dir=str(tmp_path / "ds"), in_memory=True, random_flip=True))
    assert isinstance(streamed, ArrowSource) and isinstance(loaded, TensorSource)
    assert streamed.shape == loaded.shape == (3, 8, 8) and len(streamed) == len(loaded) == 50
    plan_s, plan_l = BatchPlan(streamed, 16, 2, seed=3), BatchPlan(loaded, 16, 2, seed=3)
    for step in range(7):                                             # 7 x 16 draws: the third epoch
        for j in range(2):
            a = plan_s.micro(step, j, torch.Generator().manual_seed(step * 2 + j))
            b = plan_l.micro(step, j, torch.Generator().manual_seed(step * 2 + j))
            assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(streamed.sample_x0(20, g1), loaded.sample_x0(20, g2))


SCRIPT = ("import resource, sys\n"
          "from gradscore_train.train import _main\n"
          "code = _main(sys.argv[1:])\n"
          "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
          "sys.exit(code)\n")


def _peak_rss_kb(data_dir, out):
    """Peak RSS of a 3-step training process (no diagnostics: on 3x32x32 images the gradient error trains a
    neural critic, minutes on this machine)."""
    args = ["--config", "configs/digits/l2.yaml", "--output-dir", str(out), "--max-steps", "3", "--no-progress",
            "data.kind=hf", f"data.data_dir={data_dir}", "data.resolution=null", "data.in_memory=false",
            "train.batch_size=8", "model.block_out_channels=[16,32]", "train.checkpoint_every=0",
            "train.warmup_steps=0", "eval.sample_every=0", "eval.num_samples=8", "eval.sample_steps=2",
            "eval.diag_samples=16", "eval.diag_times=[]", "eval.quality=false",
            "train.mixed_precision=no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("MAXRSS_KB")[1].split()[0])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_data_set(tmp_path):
    _write_dataset(tmp_path / "small", 2000)
    _write_dataset(tmp_path / "large", 20000, seed=1)
    small = _peak_rss_kb(tmp_path / "small", tmp_path / "run-small")
    large = _peak_rss_kb(tmp_path / "large", tmp_path / "run-large")
    print(f"peak RSS: 2,000 images {small / 1024:.0f} MiB, 20,000 images {large / 1024:.0f} MiB")
    assert large <= 1.10 * small, (small, large)
