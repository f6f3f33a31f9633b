"""Sample quality: exact likelihoods for toy mixtures, Frechet distances for images.

* Toys (``GaussianMixture`` targets): ``mixture_nll`` is the exact cross-entropy
  ``E_q[-log p_0(x)]`` of samples ``x ~ q`` under the target; compare with the target's entropy
  ``H(p_0) = E_p[-log p_0]`` (``mixture_entropy``). It rewards mode collapse, so read it beside
  ``energy_distance`` / ``sliced_wasserstein`` to fresh target samples (``toy_quality``).
* Images: ``FeatureNet``, a small classifier trained once on the data set and cached by a key
  (``feature_net``); ``classifier_frechet_distance`` is the Frechet distance of its penultimate
  features. ``inception_fid`` is the standard FID through ``torchmetrics`` when the user supplies
  Inception weights (optional dependency). The same classifier judges what the samples depict:
  ``class_accuracy`` (a class-conditional model's samples of label ``k`` classified as ``k``) and
  ``class_coverage`` (the share of each class among an unconditional model's samples).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import energy_distance, frechet_distance, gaussian_stats, sliced_wasserstein
from .toy import GaussianMixture

__all__ = ["mixture_nll", "mixture_entropy", "toy_quality", "FeatureNet", "train_feature_net", "feature_net",
           "classifier_frechet_distance", "class_accuracy", "class_coverage", "inception_fid"]


# ----------------------------------------------------------------------------- toys
def mixture_nll(mixture: GaussianMixture, x: torch.Tensor) -> tuple[float, float]:
    """``(mean, stderr)`` of ``-log p_0(x)`` over samples ``x: [N, d]`` (``inf`` if any is non-finite)."""
    x = x.reshape(x.shape[0], -1).double()
    if not torch.isfinite(x).all():
        return float("inf"), float("nan")
    nll = -mixture.log_prob(x)
    return float(nll.mean()), float(nll.std() / math.sqrt(max(nll.numel() - 1, 1)))


def mixture_entropy(mixture: GaussianMixture, n: int = 20000,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """Monte-Carlo ``(H(p_0), stderr)``: the NLL of exact samples, the floor ``mixture_nll`` approaches."""
    return mixture_nll(mixture, mixture.sample(n, generator=generator, dtype=torch.float64))


def toy_quality(mixture: GaussianMixture, samples: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, float]:
    """Quality of ``samples: [N, d]`` against a mixture target.

    Returns ``nll`` (and ``nll_stderr``), ``entropy`` (the value exact samples give), ``energy_distance``
    and ``sliced_wasserstein`` to ``N`` fresh target samples, and ``energy_distance_floor`` (between
    two fresh target samples of size ``N``: the noise level of the energy distance)."""
    n = samples.shape[0]
    ref = mixture.sample(n, generator=generator, dtype=torch.float64)
    ref2 = mixture.sample(n, generator=generator, dtype=torch.float64)
    nll, nll_se = mixture_nll(mixture, samples)
    ent, _ = mixture_nll(mixture, ref)
    return {"nll": nll, "nll_stderr": nll_se, "entropy": ent,
            "energy_distance": energy_distance(samples, ref), "energy_distance_floor": energy_distance(ref2, ref),
            "sliced_wasserstein": sliced_wasserstein(samples, ref, generator=generator)}


# ----------------------------------------------------------------------------- image features
class FeatureNet(nn.Module):
    """A small conv classifier ``[B, C, H, W] -> logits [B, K]``; ``features(x) -> [B, width]``."""

    def __init__(self, channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.config = {"channels": channels, "num_classes": num_classes, "width": width}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, epochs: int = 10, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, width: int = 64) -> tuple[FeatureNet, float]:
    """Fit a ``FeatureNet`` on ``images: [N, C, H, W]`` in ``[-1, 1]`` and ``labels: [N]``; returns
    ``(net, held_out_accuracy)`` (10% held out)."""
    labels = torch.as_tensor(labels).long()
    if images.shape[0] != labels.shape[0] or images.shape[0] < 10:
        raise ValueError(f"need >= 10 images with one label each, got {images.shape[0]} images and "
                         f"{labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=g)
    n_val = max(images.shape[0] // 10, 1)
    val, tr = perm[:n_val], perm[n_val:]
    net = FeatureNet(images.shape[1], int(labels.max()) + 1, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        order = tr[torch.randperm(tr.numel(), generator=g)]
        for i in range(0, order.numel(), batch_size):
            b = order[i:i + batch_size]
            loss = F.cross_entropy(net(images[b].float()), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(images[val].float()).argmax(1) == labels[val]).float().mean())
    return net, acc


def feature_net(key: str, images: torch.Tensor, labels: torch.Tensor, cache_dir: str,
                **train_kwargs: Any) -> FeatureNet:
    """The ``FeatureNet`` for data set ``key``: loaded from ``cache_dir/<key>.safetensors`` or trained once
    and saved."""
    from safetensors.torch import load_file, save_file

    cache_dir = os.path.expanduser(cache_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    weights, meta = os.path.join(cache_dir, f"{safe}.safetensors"), os.path.join(cache_dir, f"{safe}.json")
    if os.path.isfile(weights) and os.path.isfile(meta):
        with open(meta) as f:
            info = json.load(f)
        net = FeatureNet(**info["config"])
        net.load_state_dict(load_file(weights))
        return net.eval()
    net, acc = train_feature_net(images, labels, **train_kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    # processes that miss the cache at once (parallel runs of an ablation) each write their own temporary files and
    # rename them into place: a reader never sees half a file, and the weights land before the metadata it checks
    tmp = f"{weights}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    tmp = f"{meta}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"config": net.config, "held_out_accuracy": acc, "key": key}, f)
    os.replace(tmp, meta)
    return net


@torch.no_grad()
def _features(net: FeatureNet, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    p = next(net.parameters())
    chunks = [net.features(x[i:i + batch_size].to(p)).double().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(chunks)


def classifier_frechet_distance(net: FeatureNet, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between the feature Gaussians of ``real`` and ``fake`` images ``[N, C, H, W]`` in
    ``[-1, 1]``."""
    if not torch.isfinite(fake).all():
        return float("inf")
    return frechet_distance(*gaussian_stats(_features(net, real)), *gaussian_stats(_features(net, fake)))


@torch.no_grad()
def _predict(net: FeatureNet, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    p = next(net.parameters(), x)                  # a net without parameters sees the samples as they are
    return torch.cat([net(x[i:i + batch_size].to(p)).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)])


def class_accuracy(net: nn.Module, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How often the classifier ``net`` labels a conditional model's samples ``[N, C, H, W]`` (in ``[-1, 1]``)
    with the label they were drawn for (``labels: [N]``): ``{"accuracy": overall, "accuracy/<k>": per class k}``
    (classes absent from ``labels`` are left out). Non-finite samples count as wrong."""
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != samples.shape[:1]:
        raise ValueError(f"labels must be [N] with N = {samples.shape[0]} samples, got shape {tuple(labels.shape)}")
    finite = torch.isfinite(samples.flatten(1)).all(1).cpu()
    pred = torch.full_like(labels, -1)
    if finite.any():
        pred[finite] = _predict(net, samples[finite])
    hit = (pred == labels).double()
    out = {"accuracy": float(hit.mean())}
    for k in labels.unique().tolist():
        out[f"accuracy/{k}"] = float(hit[labels == k].mean())
    return out


def class_coverage(net: nn.Module, samples: torch.Tensor, num_classes: int) -> dict[str, float]:
    """The classes an unconditional model's samples depict, by the classifier ``net``: ``{"share/<k>": fraction
    of samples labelled k, "coverage": fraction of the ``num_classes`` classes holding at least half of a uniform
    share (1/(2K)) of the samples}``. Non-finite samples belong to no class. For data with balanced classes
    (the digits: 174-183 per class), coverage 1 means no class is missing or starved."""
    finite = torch.isfinite(samples.flatten(1)).all(1).cpu()
    pred = _predict(net, samples[finite]) if finite.any() else torch.zeros(0, dtype=torch.long)
    share = torch.bincount(pred, minlength=num_classes)[:num_classes].double() / max(samples.shape[0], 1)
    out = {f"share/{k}": float(share[k]) for k in range(num_classes)}
    out["coverage"] = float((share >= 0.5 / num_classes).double().mean())
    return out


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str, batch_size: int = 64,
                  device: torch.device | str | None = None) -> float:
    """Standard FID (Inception-v3 pool features) through ``torchmetrics`` with user-supplied weights
    (the FID Inception checkpoint, e.g. ``pt_inception-2015-12-05-6726825d.pth``). Images ``[N, C, H, W]`` in
    ``[-1, 1]``."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError("inception_fid needs torchmetrics with its image extra: pip install 'torchmetrics[image]' "
                          "(and pass the Inception weights file; nothing is downloaded)") from e
    if not os.path.isfile(os.path.expanduser(weights_path)):
        raise FileNotFoundError(f"Inception weights {weights_path!r} not found; "
                                "supply the FID Inception checkpoint file")
    fid = FrechetInceptionDistance(feature=2048, normalize=True,
                                   feature_extractor_weights_path=os.path.expanduser(weights_path))
    if device is not None:
        fid = fid.to(device)
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, imgs.shape[0], batch_size):
            b = ((imgs[i:i + batch_size].float() + 1) / 2).clamp(0, 1)
            b = b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b
            fid.update(b.to(fid.device), real=is_real)
    return float(fid.compute())
