"""Training data: exact toy mixtures in any dimension, digits, imagefolders; the step-indexed batch
plan; clear errors for bad data."""
from __future__ import annotations

import math

import pytest
import torch

from gradscore_train.config import DataConfig
from gradscore_train.data import (
    BatchPlan,
    DataError,
    TensorSource,
    ToySource,
    build_source,
    images_from_dataset,
    toy_mixture,
)


def test_random_mixture_in_5d_has_the_exact_density():
    # oracle: a one-component "mixture" is N(mu, s^2 I): log p = -|x - mu|^2 / (2 s^2) - d log s - d/2 log 2 pi
    mix = toy_mixture(DataConfig(preset="random", dim=5, components=1, component_std=0.3))
    x = mix.sample(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = mix.means[0]
    exact = -((x - mu) ** 2).sum(1) / (2 * 0.09) - 5 * math.log(0.3) - 2.5 * math.log(2 * math.pi)
    torch.testing.assert_close(mix.log_prob(x), exact, rtol=0, atol=1e-10)
    assert ToySource(toy_mixture(DataConfig(preset="random", dim=7, components=3))).shape == (7,)


@pytest.mark.parametrize("dim", [2, 8, 32])
def test_random_mixture_means_have_the_documented_spread(dim):
    """data.spread (config comment): means ~ spread * N(0, I) scaled by sqrt(2 / dim) above 2-D, so
    E|mean|^2 = 2 spread^2 in every dimension. Oracle: |mean|^2 / (2 spread^2) ~ chi2_dim / dim, whose
    average over 4000 components has standard deviation sqrt(2 / (dim 4000)) <= 0.016: tolerance 0.06."""
    spread = 1.5
    mix = toy_mixture(DataConfig(preset="random", dim=dim, components=4000, spread=spread))
    ratio = float((mix.means.double() ** 2).sum(1).mean()) / (2 * spread**2)
    assert ratio == pytest.approx(1.0, abs=0.06)


def test_preset_dimension_mismatch_is_explained():
    with pytest.raises(DataError, match=r"preset='ring8' is 2-dimensional but data.dim=3"):
        toy_mixture(DataConfig(preset="ring8", dim=3))
    with pytest.raises(DataError, match=r"data.preset must be one of"):
        toy_mixture(DataConfig(preset="ring9"))


def test_digits_are_scaled_to_unit_interval_with_labels():
    src = build_source(DataConfig(kind="digits"))
    assert src.images.shape == (1797, 1, 8, 8) and src.labels.shape == (1797,)
    assert float(src.images.min()) == -1.0 and float(src.images.max()) == 1.0
    assert build_source(DataConfig(kind="digits", resolution=16, max_images=10)).images.shape == (10, 1, 16, 16)


@pytest.mark.parametrize("images,pattern", [
    (torch.zeros(0, 1, 8, 8), r"empty"),
    (torch.zeros(4, 8, 8), r"must be \[N, C, H, W\]"),
    (torch.zeros(4, 8, 8, 3), r"1 or 3 channels"),
    (torch.tensor([0.0, float("nan")]).repeat(8, 1, 4, 2)[:, :1], r"8 images hold NaN or Inf \(first at index 0\)"),
    (torch.full((2, 1, 4, 4), 3.0), r"pixel values must lie in \[-1, 1\]"),
])
def test_bad_images_are_rejected(images, pattern):
    with pytest.raises(DataError, match=pattern):
        TensorSource(images, name="bad")


def test_batch_plan_walks_epochs_and_ignores_the_split():
    src = TensorSource(torch.linspace(-1, 1, 10).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous())
    g = torch.Generator()
    one = BatchPlan(src, global_batch=4, num_micro=1, seed=3)
    four = BatchPlan(src, global_batch=4, num_micro=4, seed=3)
    seen = torch.cat([one.indices(s, 0) for s in range(5)])            # 20 draws = 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])                       # reshuffled each epoch
    for s in range(5):                                                  # same examples however the batch is split
        assert torch.equal(torch.cat([four.indices(s, j) for j in range(4)]), one.indices(s, 0))
    with pytest.raises(DataError, match=r"batch_size=4 must be divisible by processes x train.grad_accum = 3"):
        BatchPlan(src, 4, 3, 0)
    assert one.micro(2, 0, g).shape == (4, 1, 2, 2)


def test_datasets_imagefolder_and_in_memory_sets(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (6, 6), (255 * (c == "a"), 40 * i, 0)).save(tmp_path / c / f"{i}.png")
    src = build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path), resolution=4))
    assert src.images.shape == (6, 3, 4, 4) and sorted(src.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path), channels=1)).images.shape == (6, 1, 6, 6)
    # an in-memory datasets.Dataset, mixed sizes without data.resolution -> clear error
    imgs = [Image.new("L", (4, 4), 10), Image.new("L", (5, 5), 20)]
    ds = Dataset.from_dict({"image": imgs}).cast_column("image", ImageFeature())
    with pytest.raises(DataError, match=r"image 1 has shape .* set data.resolution"):
        images_from_dataset(ds, DataConfig(kind="hf", name="x"), "x")
    assert images_from_dataset(ds, DataConfig(kind="hf", name="x", resolution=4), "x").images.shape == (2, 1, 4, 4)
    with pytest.raises(DataError, match=r"data.image_column='pic' is not a column"):
        images_from_dataset(ds, DataConfig(kind="hf", name="x", image_column="pic"), "x")
    with pytest.raises(DataError, match=r"empty"):
        images_from_dataset(Dataset.from_dict({"image": []}), DataConfig(kind="hf", name="x"), "x")


def test_empty_imagefolder_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty"):
        build_source(DataConfig(kind="imagefolder", data_dir=str(tmp_path / "empty")))
