"""Export to and import from diffusers pipeline folders (gradscore/pipelines.py), offline: small random UNets."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

import gradscore as gs

SCHEDULER = DDPMScheduler()          # the default config (clip_sample=True), as a pipeline user gets it
SDE = gs.DiscreteVPSDE.from_scheduler(SCHEDULER)
SHAPE = (3, 1, 8, 8)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       add_attention=False)


def pipeline_images(pipe, steps, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                output_type="np").images


def as_pipeline_images(x):
    """gradscore samples [B, C, H, W] in [-1, 1] as the pipeline's output: (x / 2 + 1/2) clamped, channels last."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


MODELS = {
    "eps": lambda: gs.ScoreModel(tiny_unet(), SDE, output="eps"),
    "x0": lambda: gs.ScoreModel(tiny_unet(), SDE, output="x0"),
    "score": lambda: gs.ScoreModel(tiny_unet(), SDE, output="score"),
    "energy": lambda: gs.EnergyScore(tiny_unet(), SDE, energy="inner"),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_exported_pipeline_samples_what_gradscore_samples(kind, tmp_path):
    # Oracle: the same computation two ways. DDPMPipeline.from_pretrained on the exported folder and
    # gradscore.sample(model, sde, shape, scheduler=the pipeline's scheduler) from the same generator run the same
    # chain (same noise, same prediction); max difference 1e-5 (float32 round-off of eps = -sigma (-eps / sigma)
    # and of the timestep passed as 999 t, over 20 steps). Then the score of load_pretrained(folder) equals the
    # original (1e-5) and has the same class.
    model = MODELS[kind]().eval()
    gs.export_pipeline(model, SCHEDULER, tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    expected = {"x0": "sample"}.get(kind, "epsilon")
    assert pipe.scheduler.config.prediction_type == expected
    assert type(pipe.unet).__name__ == ("UNet2DModel" if kind in ("eps", "x0") else "ScoreEpsUNet")
    images = pipeline_images(pipe, steps=20)
    x = gs.sample(model, SDE, SHAPE, scheduler=pipe.scheduler, steps=20, generator=torch.Generator().manual_seed(0))
    assert np.abs(images - as_pipeline_images(x)).max() < 1e-5
    assert 0.05 < images.std()                     # not a constant image (the comparison could not fail)
    loaded, sde = gs.load_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(sde.alphas_cumprod, SDE.alphas_cumprod)
    x_t, t = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, 0.5, 0.9])
    assert (loaded(x_t, t) - model(x_t, t)).abs().max() < 1e-5


def test_exported_energy_model_runs_in_ddim_pipeline(tmp_path):
    # DDIMPipeline converts the saved scheduler to DDIM; the exported energy model must give what gradscore.sample
    # gives with DDIMScheduler.from_config of the same config (1e-5, as above).
    model = MODELS["energy"]().eval()
    gs.export_pipeline(model, SCHEDULER, tmp_path)
    images = pipeline_images(DDIMPipeline.from_pretrained(tmp_path), steps=10)
    x = gs.sample(model, SDE, SHAPE, scheduler=DDIMScheduler.from_config(SCHEDULER.config), steps=10,
                  generator=torch.Generator().manual_seed(0))
    assert np.abs(images - as_pipeline_images(x)).max() < 1e-5


def test_energy_backbone_saved_as_is_samples_wrong(tmp_path):
    # What export_pipeline prevents: an energy model's UNet saved as the pipeline's UNet is read as an eps predictor
    # and runs without error, but it samples something else than the energy model does.
    model = MODELS["energy"]().eval()
    DDPMPipeline(unet=model.backbone, scheduler=SCHEDULER).save_pretrained(tmp_path)
    images = pipeline_images(DDPMPipeline.from_pretrained(tmp_path), steps=20)
    x = gs.sample(model, SDE, SHAPE, scheduler=SCHEDULER, steps=20, generator=torch.Generator().manual_seed(0))
    assert np.abs(images - as_pipeline_images(x)).max() > 0.1


def test_unet_folder_loads_with_its_scheduler(tmp_path):
    # A bare UNet folder: the schedule comes from scheduler=, or from a scheduler folder beside it; without either
    # the error names the folder. The loaded model is ScoreModel(unet, sde, "eps") with the same score (1e-6).
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="unet.*scheduler="):
        gs.load_pretrained(tmp_path / "unet")
    model, sde = gs.load_pretrained(tmp_path / "unet", scheduler=SCHEDULER)
    SCHEDULER.save_pretrained(tmp_path / "scheduler")
    model2, _ = gs.load_pretrained(tmp_path / "unet")
    ref = gs.ScoreModel(unet, SDE).eval()
    x_t, t = torch.randn(*SHAPE), torch.tensor([0.2, 0.4, 0.6])
    with torch.no_grad():
        assert (model(x_t, t) - ref(x_t, t)).abs().max() < 1e-6
        assert (model2(x_t, t) - ref(x_t, t)).abs().max() < 1e-6


def test_load_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model"):
        gs.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        gs.load_pretrained(tmp_path / "absent")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(FileNotFoundError, match="names no 'unet'"):
        gs.load_pretrained(tmp_path)
    v = tmp_path / "v"
    tiny_unet().save_pretrained(v / "unet")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(v / "scheduler")
    with pytest.raises(ValueError, match="v_prediction"):
        gs.load_pretrained(v / "unet")


def test_export_refuses_what_it_cannot_save(tmp_path):
    with pytest.raises(TypeError, match="UNet2DModel"):
        gs.export_pipeline(gs.ScoreModel(gs.TimeMLP(2), SDE), SCHEDULER, tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        gs.export_pipeline(gs.ScoreModel(tiny_unet(), gs.VPSDE()), SCHEDULER, tmp_path)
    custom = gs.EnergyScore(tiny_unet(), SDE, energy=lambda f, x, sigma: (x * f).flatten(1).sum(1))
    with pytest.raises(ValueError, match="custom energy"):
        gs.export_pipeline(custom, SCHEDULER, tmp_path)
