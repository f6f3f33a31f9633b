"""Training data as deterministic, step-indexed batches.

Every source is a ``Source`` with ``batch(indices_or_n, generator) -> x0 [B, *D]`` and
``sample_x0(n, generator)``. ``BatchPlan`` maps ``(step, micro-batch index j)`` to the examples
of that micro-batch from the seed alone, so a resumed run sees the same data in the same order,
and the split of a global batch across processes and accumulation does not change which
examples are drawn (micro-batch ``j = micro * num_processes + rank``).

Sources:
* ``ToySource``: a ``gradscore.toy.GaussianMixture`` (exact density; fresh samples every batch).
* ``TensorSource``: a finite set of images ``[N, C, H, W]`` in ``[-1, 1]`` (digits, an imagefolder,
  a ``datasets`` image set), drawn without replacement in epochs reshuffled from the seed.
* ``gradscore_train.latents.LatentSource`` (``data.autoencoder``): those images encoded once by a diffusers
  autoencoder, the latents cached on disk; samples decoded for plots and quality.
* ``ArrowSource``: a ``datasets`` image set larger than memory, read memory-mapped and decoded per
  micro-batch, in the same ``BatchPlan`` order (``data.in_memory``).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from gradscore.toy import PRESETS, GaussianMixture

__all__ = ["DataError", "ToySource", "TensorSource", "ArrowSource", "BatchPlan", "build_source", "toy_mixture",
           "check_images", "micro_seed"]


class DataError(ValueError):
    """Training data that cannot be used (wrong shape, non-finite values, empty)."""


_U64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """The SplitMix64 finaliser (Steele, Lea and Flood 2014): a bijection of 64-bit integers whose
    output bits each depend on every input bit."""
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def micro_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (independent streams for every step and micro-batch):
    SplitMix64 chained over the keys in pure Python, called once per micro-batch (numpy's
    SeedSequence did the same at many times the cost: BENCHMARKS.md, section "Training driver overhead")."""
    h = _splitmix64(int(seed) & _U64)
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _U64))
    return h >> 1


def toy_mixture(cfg) -> GaussianMixture:
    """The mixture named by a ``DataConfig`` (``preset`` 2-D, or ``"random"`` in ``dim`` dimensions)."""
    if cfg.preset == "random":
        g = torch.Generator().manual_seed(cfg.mixture_seed)
        means = cfg.spread * torch.randn(cfg.components, cfg.dim, generator=g, dtype=torch.float64)
        if cfg.dim > 2:
            means = means * math.sqrt(2.0 / cfg.dim)
        covs = cfg.component_std**2 * torch.eye(cfg.dim, dtype=torch.float64).expand(cfg.components, cfg.dim, cfg.dim)
        return GaussianMixture(means, covs)
    if cfg.preset not in PRESETS:
        raise DataError(f"data.preset must be one of {sorted(PRESETS)} or 'random', got {cfg.preset!r}")
    mix = GaussianMixture.preset(cfg.preset)
    if cfg.dim != mix.dim:
        raise DataError(f"data.preset={cfg.preset!r} is {mix.dim}-dimensional but data.dim={cfg.dim}; "
                        f"use data.preset=random for a mixture in {cfg.dim} dimensions")
    return mix


class ToySource:
    """Fresh samples of a Gaussian mixture; ``x0: [B, d]``."""

    finite = False

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture
        self.shape = (mixture.dim,)

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.mixture.sample(n, generator=generator)

    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mixture.sample(n, generator=generator)

    def key(self) -> str:
        return f"toy-{self.mixture.num_components}x{self.mixture.dim}"


def check_images(x, name: str) -> torch.Tensor:
    """Validate an image tensor ``[N, C, H, W]`` (finite, non-empty, C in {1, 3}); returns it as float."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.numel() == 0 or x.shape[0] == 0:
        raise DataError(f"{name}: the data set is empty")
    if x.dim() != 4:
        raise DataError(f"{name}: images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise DataError(f"{name}: images must have 1 or 3 channels, got shape {tuple(x.shape)} (channels first)")
    x = x.float()
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} images hold NaN or Inf (first at index {int(bad.nonzero()[0])})")
    return x


class TensorSource:
    """A finite image set ``images: [N, C, H, W]`` scaled to ``[-1, 1]``, optional ``labels: [N]``."""

    finite = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, name: str = "images",
                 random_flip: bool = False):
        self.images = check_images(images, name)
        lo, hi = float(self.images.min()), float(self.images.max())
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise DataError(f"{name}: pixel values must lie in [-1, 1] after scaling, got [{lo:.3g}, {hi:.3g}]")
        if labels is not None:
            labels = torch.as_tensor(labels).long()
            if labels.shape != (self.images.shape[0],):
                raise DataError(f"{name}: labels must be [N] = [{self.images.shape[0]}], got {tuple(labels.shape)}")
        self.labels, self.name, self.random_flip = labels, name, random_flip
        self.shape = tuple(self.images.shape[1:])

    def __len__(self):
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self.images[indices]
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if n <= len(self):
            idx = torch.randperm(len(self), generator=generator)[:n]
        else:
            idx = torch.randint(len(self), (n,), generator=generator)
        return self.images[idx]

    def key(self) -> str:
        return f"{self.name}-{len(self)}x{'x'.join(map(str, self.shape))}"


class BatchPlan:
    """Which examples micro-batch ``j`` of optimizer step ``step`` holds, from the seed alone.

    A global step consumes ``global_batch`` examples split into ``num_micro`` micro-batches of
    ``micro_batch``; finite sources walk through epoch permutations drawn from ``(seed, epoch)``.
    """

    def __init__(self, source, global_batch: int, num_micro: int, seed: int):
        if global_batch % num_micro:
            raise DataError(f"train.batch_size={global_batch} must be divisible by processes x train.grad_accum "
                            f"= {num_micro}")
        if source.finite and len(source) < global_batch:
            raise DataError(f"{getattr(source, 'name', 'the data set')}: {len(source)} examples, fewer than "
                            f"train.batch_size={global_batch} (a batch would repeat examples); lower "
                            "train.batch_size or add data (data.max_images)")
        self.source, self.global_batch, self.num_micro, self.seed = source, global_batch, num_micro, seed
        self.micro_batch = global_batch // num_micro
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(micro_seed(self.seed, 1, epoch))
            self._perm_cache[epoch] = torch.randperm(len(self.source), generator=g)
        return self._perm_cache[epoch]

    def indices(self, step: int, j: int) -> torch.Tensor:
        n = len(self.source)
        start = step * self.global_batch + j * self.micro_batch
        pos = torch.arange(start, start + self.micro_batch)
        epochs, offs = pos // n, pos % n
        return torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offs)]) if epochs.unique().numel() > 1 \
            else self._perm(int(epochs[0]))[offs]

    def micro(self, step: int, j: int, generator: torch.Generator) -> torch.Tensor:
        """``x0 [micro_batch, *D]`` of micro-batch ``j`` of step ``step``."""
        if self.source.finite:
            return self.source.batch(self.indices(step, j), generator)
        return self.source.batch(self.micro_batch, generator)

    def labels(self, step: int, j: int) -> torch.Tensor:
        """The class labels ``[micro_batch]`` of the examples of ``micro(step, j)`` (a finite source with labels)."""
        if not self.source.finite or getattr(self.source, "labels", None) is None:
            raise DataError(f"{getattr(self.source, 'name', type(self.source).__name__)}: the data have no labels, "
                            "so no class-conditional model (model.num_classes > 0) can train on them; for an "
                            "imagefolder or datasets set, set data.label_column")
        return self.source.labels[self.indices(step, j)]


# ----------------------------------------------------------------------------- image loading
def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    if resolution is None or (x.shape[-1] == resolution and x.shape[-2] == resolution):
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


def _channels(x: torch.Tensor, channels: int | None, name: str) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:
        return x.mean(1, keepdim=True)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise DataError(f"{name}: cannot convert {x.shape[1]} channels to data.channels={channels}")


def load_digits_source(cfg) -> TensorSource:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16) scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    if cfg.max_images is not None:
        x, y = x[:cfg.max_images], y[:cfg.max_images]
    x = _channels(_resize(x, cfg.resolution), cfg.channels, "digits").clamp(0, 1)
    return TensorSource(x * 2 - 1, y, name="digits", random_flip=cfg.random_flip)


def _pick_columns(ds, cfg, name):
    from datasets import Image

    image_col = cfg.image_column
    if image_col is None:
        image_col = next((c for c, f in ds.features.items() if isinstance(f, Image)), None)
        if image_col is None:
            raise DataError(f"{name}: no Image column among {list(ds.features)}; set data.image_column")
    elif image_col not in ds.features:
        raise DataError(f"{name}: data.image_column={image_col!r} is not a column; columns are {list(ds.features)}")
    label_col = cfg.label_column
    if label_col is None:
        label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.features), None)
    elif label_col not in ds.features:
        raise DataError(f"{name}: data.label_column={label_col!r} is not a column; columns are {list(ds.features)}")
    return image_col, label_col


_GREY, _COLOUR = "L", "RGB"
_GREY_MODES = ("L", "1", "I", "I;16", "F")


def _words(mode: str) -> str:
    return "greyscale (1 channel)" if mode == _GREY else "colour (3 channels)"


def _which(ds, column: str, i: int) -> str:
    """``image i`` and, when the data set knows it, its file (read undecoded; called for messages only)."""
    from datasets import Image

    try:
        path = (ds.cast_column(column, Image(decode=False))[i][column] or {}).get("path")
    except Exception:   # an in-memory or streamed set may not keep paths: the index alone then
        path = None
    return f"image {i} ({path})" if path else f"image {i}"


class _Decoder:
    """One image of a ``datasets`` image set as ``uint8 [C, H, W]``: converted to ``data.channels`` (or to
    image 0's kind), resized to ``data.resolution``; a ``DataError`` naming the image (and its file) for
    NaN/Inf in a float image, a channel kind or a size unlike image 0's."""

    def __init__(self, ds, cfg, name: str, image_col: str):
        self.ds, self.cfg, self.name, self.col = ds, cfg, name, image_col
        self.mode = {1: "L", 3: "RGB", None: None}[cfg.channels]
        self.shape = None
        self.shape = self(0, ds[0][image_col]).shape

    def __call__(self, i: int, img) -> np.ndarray:
        ds, col, name, cfg = self.ds, self.col, self.name, self.cfg
        if img.mode in ("F", "I", "I;16"):          # float / integer images: convert() would crush NaN to 0
            raw = np.asarray(img)
            if not np.isfinite(raw).all():
                bad = int((~np.isfinite(raw)).sum())
                raise DataError(f"{name}: {_which(ds, col, i)} holds {bad} NaN or Inf pixels")
        own = _GREY if img.mode in _GREY_MODES else _COLOUR
        if cfg.channels is None:
            if self.mode is None:
                self.mode = own
            elif own != self.mode:
                raise DataError(f"{name}: {_which(ds, col, i)} is {_words(own)} but {_which(ds, col, 0)} "
                                f"is {_words(self.mode)}; set data.channels (1 or 3) to convert every image")
        img = img.convert(self.mode)
        if cfg.resolution is not None and img.size != (cfg.resolution, cfg.resolution):
            img = img.resize((cfg.resolution, cfg.resolution), resample=3)   # bicubic
        a = np.asarray(img, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if self.shape is not None and a.shape != self.shape:
            raise DataError(f"{name}: {_which(ds, col, i)} has shape {a.shape}, image 0 has {self.shape}; "
                            "set data.resolution to resize")
        return a


class ArrowSource:
    """A ``datasets`` image set read where it lies (memory-mapped Arrow), decoded batch by batch: only the
    examples of a micro-batch are in memory, on every rank. ``batch(indices)`` gives ``x0 [B, C, H, W]`` in
    ``[-1, 1]`` (checked like ``TensorSource``); the order is ``BatchPlan``'s, a function of (seed, step),
    as for in-memory sets. No ``labels`` (the classifier of the quality metrics would need every image)."""

    finite = True
    labels = None

    def __init__(self, ds, cfg, name: str, image_col: str):
        self.ds, self.name, self.random_flip = ds, name, cfg.random_flip
        self.decode = _Decoder(ds, cfg, name, image_col)
        self.shape = tuple(self.decode.shape)

    def __len__(self):
        return len(self.ds)

    def _images(self, indices) -> torch.Tensor:
        idx = [int(i) for i in indices]
        column = self.ds[idx][self.decode.col]
        x = torch.from_numpy(np.stack([self.decode(i, img) for i, img in zip(idx, column)])).float() / 127.5 - 1.0
        return check_images(x, self.name)

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self._images(indices)
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if n <= len(self):
            idx = torch.randperm(len(self), generator=generator)[:n]
        else:
            idx = torch.randint(len(self), (n,), generator=generator)
        return self._images(idx)

    def key(self) -> str:
        return f"{self.name}-{len(self)}x{'x'.join(map(str, self.shape))}"


IN_MEMORY_BYTES = 1 << 30     # data.in_memory=null: decode into memory up to 1 GiB of float32 pixels


def images_from_dataset(ds, cfg, name: str):
    """A ``datasets.Dataset`` of images as a ``TensorSource`` (decoded into memory: resized, ``[-1, 1]``)
    or, with ``data.in_memory=false`` (or ``null`` and more than ``IN_MEMORY_BYTES`` of pixels), an
    ``ArrowSource`` reading the memory-mapped set batch by batch."""
    if len(ds) == 0:
        raise DataError(f"{name}: the data set is empty")
    image_col, label_col = _pick_columns(ds, cfg, name)
    n = len(ds) if cfg.max_images is None else min(len(ds), cfg.max_images)
    if n < len(ds):
        ds = ds.select(range(n))
    decode = _Decoder(ds, cfg, name, image_col)
    in_memory = cfg.in_memory
    if in_memory is None:
        in_memory = n * int(np.prod(decode.shape)) * 4 <= IN_MEMORY_BYTES
    if not in_memory:
        return ArrowSource(ds, cfg, name, image_col)
    xs, ys = [], []
    for i in range(n):
        ex = ds[i]
        xs.append(decode(i, ex[image_col]))
        if label_col is not None:
            ys.append(int(ex[label_col]))
    x = torch.from_numpy(np.stack(xs)).float() / 127.5 - 1.0
    y = torch.tensor(ys) if label_col is not None else None
    return TensorSource(x, y, name=name, random_flip=cfg.random_flip)


def load_image_source(cfg):
    """An imagefolder (``load_dataset("imagefolder", data_dir=...)``), a ``datasets`` folder written by
    ``save_to_disk`` (``data.kind=hf`` with ``data.data_dir`` and no ``data.name``) or a locally cached
    ``datasets`` set; in memory or memory-mapped (``images_from_dataset``)."""
    from datasets import load_dataset

    if cfg.kind == "imagefolder":
        root = os.path.expanduser(cfg.data_dir)
        if not os.path.isdir(root):
            raise DataError(f"data.data_dir {root!r} is not a directory")
        name = os.path.basename(os.path.normpath(root)) or "imagefolder"
        try:
            ds = load_dataset("imagefolder", data_dir=root, split=cfg.split)
        except Exception as e:  # datasets raises several types for empty/unreadable folders
            raise DataError(f"data.data_dir {root!r}: could not load an imagefolder split {cfg.split!r} "
                            f"({type(e).__name__}: {e})") from e
    elif cfg.name is None and os.path.isdir(os.path.expanduser(cfg.data_dir)):   # a save_to_disk folder
        from datasets import DatasetDict, load_from_disk

        root = os.path.expanduser(cfg.data_dir)
        name = os.path.basename(os.path.normpath(root)) or "dataset"
        try:
            ds = load_from_disk(root)           # memory-mapped Arrow files
        except Exception as e:
            raise DataError(f"data.data_dir {root!r}: not a folder written by datasets' save_to_disk "
                            f"({type(e).__name__}: {e})") from e
        if isinstance(ds, DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"data.data_dir {root!r} has splits {list(ds)}, not data.split={cfg.split!r}")
            ds = ds[cfg.split]
    else:
        name = cfg.name.replace("/", "_")
        try:
            ds = load_dataset(cfg.name, data_dir=cfg.data_dir, split=cfg.split)
        except Exception as e:
            raise DataError(f"data.name={cfg.name!r}: could not load split {cfg.split!r} from the local datasets cache "
                            f"({type(e).__name__}: {e}). Download it once with network access "
                            f"(datasets.load_dataset({cfg.name!r})) or use data.kind=imagefolder.") from e
    return images_from_dataset(ds, cfg, name)


def build_source(cfg):
    """The ``Source`` for a ``DataConfig``."""
    if cfg.kind == "toy":
        return ToySource(toy_mixture(cfg))
    pixels = load_digits_source(cfg) if cfg.kind == "digits" else load_image_source(cfg)
    if cfg.autoencoder is None:
        return pixels
    from .latents import LatentSource
    return LatentSource.encode(pixels, cfg.autoencoder, cfg.latent_cache)
