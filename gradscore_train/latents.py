"""Latent diffusion data: images encoded once by a diffusers autoencoder, cached on disk.

``z = scaling_factor * (E(x) - shift_factor)`` with ``E`` the mean of an ``AutoencoderKL``'s posterior (the
deterministic encoding) or an ``AutoencoderTiny``'s latents, read from a local folder (``data.autoencoder``:
the autoencoder's own folder, or a pipeline folder with a ``vae/`` subfolder). ``scaling_factor`` brings the
latents to about unit variance, the scale the process's prior assumes. The score model trains on ``z``;
samples are decoded (``x = D(z / scaling_factor + shift_factor)``, clamped to ``[-1, 1]``) for plots and quality.
The cache file is named by a hash of the images and of the autoencoder's config and weights, and written
atomically (every process of a multi-process run may write it; they write the same bytes).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .data import DataError, TensorSource

__all__ = ["LatentSource", "load_autoencoder", "AUTOENCODERS"]

AUTOENCODERS = ("AutoencoderKL", "AutoencoderTiny")


def _autoencoder_folder(path: str) -> str:
    folder = os.path.expanduser(path)
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        folder = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise DataError(f"data.autoencoder {path!r} holds no autoencoder: no config.json in it or in its vae/")
    return folder


def load_autoencoder(path: str):
    """A diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` from a local folder, in eval mode."""
    import diffusers

    folder = _autoencoder_folder(path)
    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name")
    if name not in AUTOENCODERS:
        raise DataError(f"data.autoencoder {path!r}: {os.path.join(folder, 'config.json')} is a {name}, "
                        f"expected one of {AUTOENCODERS}")
    return getattr(diffusers, name).from_pretrained(folder).eval()


def _fingerprint(folder: str, pixels: TensorSource) -> str:
    """sha256 over the images, the labels and the autoencoder's files (config and weights)."""
    h = hashlib.sha256()
    h.update(pixels.images.numpy().tobytes())
    if pixels.labels is not None:
        h.update(pixels.labels.numpy().tobytes())
    for name in sorted(os.listdir(folder)):
        if name.endswith((".json", ".safetensors", ".bin")):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:20]


class LatentSource:
    """A finite set of latents ``z: [N, c, h, w]`` of the images of ``pixels`` (a ``TensorSource``).

    Same interface as ``TensorSource`` (``batch``, ``sample_x0``, ``key``, ``labels``, ``shape``: the latent
    shape), plus ``pixels`` and ``decode(z) -> images [n, C, H, W]`` in ``[-1, 1]``."""

    latent = True       # samples are latents: evaluation decodes them (``evaluation.to_pixels``)

    finite = True

    def __init__(self, latents: torch.Tensor, pixels: TensorSource, autoencoder, name: str):
        if latents.dim() != 4 or latents.shape[0] != len(pixels):
            raise DataError(f"{name}: latents must be [N={len(pixels)}, c, h, w], got {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise DataError(f"{name}: the autoencoder gave non-finite latents")
        self.latents, self.pixels, self.autoencoder, self.name = latents.float(), pixels, autoencoder, name
        self.labels = pixels.labels
        self.shape = tuple(latents.shape[1:])
        cfg = autoencoder.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0))
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)

    @classmethod
    def encode(cls, pixels: TensorSource, autoencoder_path: str, cache_dir: str, batch_size: int = 256
               ) -> LatentSource:
        """Encode ``pixels`` with the autoencoder at ``autoencoder_path``, or read the cached latents."""
        if pixels.random_flip:
            raise DataError("data.random_flip does not apply to latents (a flipped image's latent is not a flipped "
                            "latent); set data.random_flip=false with data.autoencoder")
        folder = _autoencoder_folder(autoencoder_path)
        vae = load_autoencoder(autoencoder_path)
        if vae.config.in_channels != pixels.shape[0]:
            raise DataError(f"data.autoencoder {autoencoder_path!r} takes {vae.config.in_channels} channels, "
                            f"the images have {pixels.shape[0]}; set data.channels={vae.config.in_channels}")
        name = f"{pixels.name}-latent"
        path = os.path.join(os.path.expanduser(cache_dir), f"{pixels.name}-{_fingerprint(folder, pixels)}.safetensors")
        if os.path.isfile(path):
            return cls(load_file(path)["latents"], pixels, vae, name)
        source = cls(torch.zeros(len(pixels), 1, 1, 1), pixels, vae, name)   # the scale factors, for _encode
        latents = torch.cat([source._encode(pixels.images[i:i + batch_size])
                             for i in range(0, len(pixels), batch_size)])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"latents": latents.contiguous()}, tmp)
        os.replace(tmp, path)
        return cls(latents, pixels, vae, name)

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.autoencoder.encode(x)
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images ``[n, C, H, W]`` in ``[-1, 1]`` (on CPU) of latents ``z: [n, *shape]``."""
        if tuple(z.shape[1:]) != self.shape:
            raise DataError(f"{self.name}: latents to decode must be [n, {', '.join(map(str, self.shape))}], "
                            f"got {tuple(z.shape)}")
        z = z.detach().float().cpu() / self.scaling_factor + self.shift_factor
        return torch.cat([self.autoencoder.decode(z[i:i + batch_size]).sample.clamp(-1, 1)
                          for i in range(0, z.shape[0], batch_size)])

    def __len__(self):
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.latents[indices]

    def sample_x0(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if n <= len(self):
            idx = torch.randperm(len(self), generator=generator)[:n]
        else:
            idx = torch.randint(len(self), (n,), generator=generator)
        return self.latents[idx]

    def key(self) -> str:
        return f"{self.name}-{len(self)}x{'x'.join(map(str, self.shape))}"
