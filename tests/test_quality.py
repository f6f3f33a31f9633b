"""Sample-quality metrics against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from gradscore.metrics import frechet_distance, gaussian_stats
from gradscore.quality import (
    class_accuracy,
    class_coverage,
    classifier_frechet_distance,
    feature_net,
    inception_fid,
    mixture_entropy,
    mixture_nll,
    toy_quality,
)
from gradscore.toy import GaussianMixture


def test_frechet_distance_closed_forms():
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    exact = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(exact, abs=1e-10)
    # non-commuting 2x2: against scipy's general matrix square root of cov1 cov2
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)
    c1, c2 = A @ A.T + 0.1 * torch.eye(2), B @ B.T + 0.1 * torch.eye(2)
    ref = float(torch.trace(c1 + c2) - 2 * scipy.linalg.sqrtm((c1 @ c2).numpy()).real.trace())
    assert frechet_distance(torch.zeros(2), c1, torch.zeros(2), c2) == pytest.approx(ref, abs=1e-9)
    assert frechet_distance(mu1, torch.diag(a), mu1, torch.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_gaussian_stats_are_unbiased_moments():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(mu, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(cov, torch.from_numpy(__import__("numpy").cov(x.numpy().T)).double())


def test_nll_of_exact_samples_is_the_entropy():
    # N(mu, C) in 3-D: H = d/2 log(2 pi e) + 1/2 log det C. Monte Carlo with 20000 samples: within 4 stderr.
    C = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.3, 0.05], [0.0, 0.05, 0.2]], dtype=torch.float64)
    mix = GaussianMixture(torch.tensor([[1.0, -1.0, 0.5]]), C[None])
    H = 1.5 * math.log(2 * math.pi * math.e) + 0.5 * float(torch.logdet(C))
    est, se = mixture_entropy(mix, 20000, generator=torch.Generator().manual_seed(0))
    assert abs(est - H) < 4 * se
    # samples far from the target have a larger NLL; non-finite samples give inf
    assert mixture_nll(mix, torch.full((10, 3), 5.0))[0] > H + 10
    assert mixture_nll(mix, torch.full((10, 3), float("nan")))[0] == float("inf")


def test_toy_quality_separates_exact_from_wrong_samples():
    mix = GaussianMixture.preset("ring8")
    g = torch.Generator().manual_seed(0)
    good = toy_quality(mix, mix.sample(1000, generator=g), generator=g)
    bad = toy_quality(mix, 1.3 * mix.sample(1000, generator=g), generator=g)
    # exact samples: energy distance at the level of two independent target samples (3x margin for noise)
    assert good["energy_distance"] < 3 * good["energy_distance_floor"] + 1e-3
    assert bad["energy_distance"] > 10 * good["energy_distance_floor"]
    assert abs(good["nll"] - good["entropy"]) < 4 * good["nll_stderr"] + 0.05
    assert bad["nll"] > good["nll"] + 1 and bad["sliced_wasserstein"] > 3 * good["sliced_wasserstein"]


def test_classifier_frechet_distance_on_digits_is_cached(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target)
    net = feature_net("digits-test", x, y, str(tmp_path), epochs=3)
    again = feature_net("digits-test", x, y, str(tmp_path))        # loaded, not retrained
    for (k, v), (_, w) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    import json
    assert json.load(open(tmp_path / "digits-test.json"))["held_out_accuracy"] > 0.8
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    real, real2 = x[perm[:800]], x[perm[800:1600]]
    same = classifier_frechet_distance(net, real, real2)
    noise = classifier_frechet_distance(net, real, torch.rand_like(real2) * 2 - 1)
    blurred = classifier_frechet_distance(net, real, torch.nn.functional.avg_pool2d(real2, 3, 1, 1))
    assert same < blurred < noise and noise > 20 * same
    # what the samples depict: real digits drawn "for" their own labels are recognised (held-out accuracy
    # above 0.8, most of these were seen in training) and for a shifted label almost never (<= the 0.2 the
    # classifier's errors allow); real digits cover every class, one repeated digit covers one class in ten
    acc = class_accuracy(net, real, y[perm[:800]])
    assert acc["accuracy"] > 0.8 and set(acc) == {"accuracy", *(f"accuracy/{k}" for k in range(10))}
    assert class_accuracy(net, real, (y[perm[:800]] + 1) % 10)["accuracy"] < 0.2
    assert class_coverage(net, real, 10)["coverage"] == 1.0
    assert class_coverage(net, real[:1].expand(100, -1, -1, -1), 10)["coverage"] == pytest.approx(0.1)


class _FixedClassifier(torch.nn.Module):
    """Labels an image by the index of its largest pixel (first row): an exact oracle for the counts."""

    def forward(self, x):
        return x.flatten(1)[:, :4]


def test_class_accuracy_and_coverage_count_exactly():
    # 8 samples whose largest of the first 4 pixels is known: predicted classes 0,0,1,1,2,3,3,3
    pred = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    x = torch.nn.functional.one_hot(pred, 16).float().reshape(8, 1, 4, 4)
    labels = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3])
    acc = class_accuracy(_FixedClassifier(), x, labels)
    assert acc == {"accuracy": 6 / 8, "accuracy/0": 1.0, "accuracy/1": 2 / 3, "accuracy/2": 0.5, "accuracy/3": 1.0}
    x_bad = x.clone()
    x_bad[0, 0, 0, 0] = float("nan")                               # a non-finite sample is wrong, whatever it shows
    assert class_accuracy(_FixedClassifier(), x_bad, labels)["accuracy/0"] == 0.0
    cov = class_coverage(_FixedClassifier(), x, 5)
    assert [cov[f"share/{k}"] for k in range(5)] == [2 / 8, 2 / 8, 1 / 8, 3 / 8, 0.0]
    assert cov["coverage"] == 4 / 5                                # class 4 holds nothing (threshold 1/10)
    with pytest.raises(ValueError, match="labels must be"):
        class_accuracy(_FixedClassifier(), x, labels[:3])


def test_inception_fid_without_torchmetrics_explains(tmp_path):
    try:
        import torchmetrics  # noqa: F401
        pytest.skip("torchmetrics installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install 'torchmetrics\[image\]'"):
        inception_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), str(tmp_path / "w.pth"))
