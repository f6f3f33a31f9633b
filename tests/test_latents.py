"""Latent diffusion data (gradscore_train/latents.py): images encoded once by a small random diffusers autoencoder
saved to a temporary folder, latents cached, samples decoded for plots and quality."""
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from gradscore_train.config import ConfigError, DataConfig, load_config
from gradscore_train.data import DataError, build_source, load_digits_source
from gradscore_train.latents import LatentSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_kl(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                         norm_num_groups=4, layers_per_block=1, sample_size=8, scaling_factor=0.5).eval()


@pytest.fixture
def kl_folder(tmp_path):
    small_kl().save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def cfg(tmp_path, autoencoder, **kw):
    return DataConfig(kind="digits", resolution=8, max_images=40, autoencoder=str(autoencoder),
                      latent_cache=str(tmp_path / "cache"), **kw)


def test_latents_are_the_scaled_posterior_mean_and_cached(tmp_path, kl_folder, monkeypatch):
    # Oracle: the autoencoder called directly: z = scaling_factor * mean of the posterior (1e-6), decode inverts
    # the scaling (1e-5). The second build reads the cache (encoding is disabled to prove it); other weights give
    # another cache file.
    source = build_source(cfg(tmp_path, kl_folder))
    assert isinstance(source, LatentSource) and source.shape == (2, 4, 4) and len(source) == 40
    vae, pixels = small_kl(), load_digits_source(cfg(tmp_path, kl_folder))
    with torch.no_grad():
        z = vae.encode(pixels.images).latent_dist.mode() * 0.5
        assert (source.latents - z).abs().max() < 1e-6
        assert (source.decode(z) - vae.decode(z / 0.5).sample.clamp(-1, 1)).abs().max() < 1e-5
    assert torch.equal(source.labels, pixels.labels)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".safetensors")
    monkeypatch.setattr(LatentSource, "_encode", lambda self, x: (_ for _ in ()).throw(AssertionError("encoded")))
    again = build_source(cfg(tmp_path, kl_folder))
    assert torch.equal(again.latents, source.latents)
    small_kl(seed=1).save_pretrained(kl_folder)
    with pytest.raises(AssertionError, match="encoded"):
        build_source(cfg(tmp_path, kl_folder))


def test_tiny_autoencoder_from_a_pipeline_folder(tmp_path):
    # AutoencoderTiny has latents, not a posterior; a pipeline folder's vae/ is found. Oracle: direct call (1e-6).
    torch.manual_seed(0)
    tiny = AutoencoderTiny(in_channels=1, out_channels=1, encoder_block_out_channels=(8, 8),
                           decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                           latent_channels=2, upsampling_scaling_factor=2).eval()
    tiny.save_pretrained(tmp_path / "pipe" / "vae")
    source = build_source(cfg(tmp_path, tmp_path / "pipe"))
    with torch.no_grad():
        assert (source.latents - tiny.encode(source.pixels.images).latents).abs().max() < 1e-6
    assert source.decode(source.latents[:3]).shape == (3, 1, 8, 8)


def test_autoencoder_errors_name_the_folder(tmp_path, kl_folder):
    with pytest.raises(DataError, match="holds no autoencoder"):
        build_source(cfg(tmp_path, tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DataError, match="is a UNet2DModel"):
        build_source(cfg(tmp_path, tmp_path / "unet"))
    with pytest.raises(DataError, match="takes 1 channels"):
        build_source(cfg(tmp_path, kl_folder, channels=3))
    with pytest.raises(DataError, match="random_flip"):
        build_source(cfg(tmp_path, kl_folder, random_flip=True))
    with pytest.raises(DataError, match=r"must be \[n, 2, 4, 4\]"):
        build_source(cfg(tmp_path, kl_folder)).decode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="data.autoencoder"):
        load_config(os.path.join(ROOT, "configs", "toy", "l2.yaml"), [f"data.autoencoder={kl_folder}"])


def test_training_on_latents_decodes_samples(tmp_path, kl_folder, monkeypatch):
    # A 2-step run on latents: the UNet has the latent channels, and the sample grid holds decoded 8x8 images
    # (1 channel), not 4x4 latents. The final quality compares decoded images with the images: the classifier
    # (training it costs ~25 s) is replaced by a recorder of what it is given, and so are the final score
    # diagnostics (25 s on 32-dimensional latents; they run on latents like on any data).
    import gradscore.quality as Q
    from gradscore_train import evaluation
    from gradscore_train.loop import run

    monkeypatch.setattr(evaluation, "score_diagnostics", lambda model, sde, x0, *a, **k: {"x0": tuple(x0.shape)})

    seen = []
    monkeypatch.setattr(Q, "feature_net", lambda key, images, labels, cache: ("net", key, tuple(images.shape)))
    monkeypatch.setattr(Q, "classifier_frechet_distance",
                        lambda net, real, fake: seen.append((net, tuple(real.shape), tuple(fake.shape))) or 0.0)
    monkeypatch.setattr(Q, "class_coverage",                         # judged on the decoded pixels too
                        lambda net, fake, k: seen.append(("coverage", tuple(fake.shape), k)) or {"coverage": 1.0})

    config = load_config(os.path.join(ROOT, "configs", "digits", "l2.yaml"), [
        f"data.autoencoder={kl_folder}", f"data.latent_cache={tmp_path / 'cache'}", "data.max_images=64",
        "model.block_out_channels=[16,32]", "train.batch_size=8", "train.max_steps=2", "train.checkpoint_every=0",
        "eval.num_samples=16", "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]",
        f"eval.classifier_cache={tmp_path / 'classifiers'}"])
    metrics = run(config, str(tmp_path / "run"))
    assert "quality/classifier_fd" in metrics and metrics["x0"] == (16, 2, 4, 4)
    assert seen[0] == (("net", "digits-64x1x8x8", (64, 1, 8, 8)), (16, 1, 8, 8), (16, 1, 8, 8))
    assert ("coverage", (16, 1, 8, 8), 10) in seen and metrics["quality/class_coverage"] == 1.0
    samples = torch.load(tmp_path / "run" / "samples" / "step-0000002.pt")
    assert samples.shape == (16, 2, 4, 4)
    import matplotlib.image
    grid = matplotlib.image.imread(tmp_path / "run" / "samples" / "step-0000002.png")
    # 16 decoded 8x8 images, 8 a row, in 9-pixel cells (19 x 73), each pixel repeated 4 times (save_grid: >= 256 wide)
    assert grid.shape[:2] == (4 * (2 * 9 + 1), 4 * (8 * 9 + 1))
