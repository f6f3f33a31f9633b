"""``python -m gradscore_train.diagnose --pretrained DIR``: a diffusers pipeline diagnosed on the config's data."""
import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

import gradscore as gs
from gradscore_train.diagnose import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits", "l2.yaml")


def export_tiny(path, in_channels=1):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=4, add_attention=False)
    sched = DDPMScheduler()
    gs.export_pipeline(gs.ScoreModel(unet, gs.DiscreteVPSDE.from_scheduler(sched)), sched, path)


def test_diagnose_a_pipeline_folder(tmp_path, monkeypatch, capsys):
    # The CLI hands the diagnostics the exported model (same score as load_pretrained's, exactly), its process and
    # the digits as x0, and writes to DIR/diagnostics. gradscore.diagnostics.diagnose itself is replaced by a
    # recorder: on 64-dimensional images it takes ~50 s, and its values are the diagnostics' own tests' business.
    import gradscore_train.diagnose as cli

    seen = {}

    def record(model, sde, x0, times, out, **kw):
        seen.update(model=model, sde=sde, x0=x0, times=times, out=out)
        return {"bounds": {"gradient": {"value": 0.0}}}

    monkeypatch.setattr(cli, "diagnose", record)
    export_tiny(tmp_path / "pipe")
    assert main(["--config", DIGITS, "--pretrained", str(tmp_path / "pipe"), "--num-data", "64", "--num-times", "2",
                 "data.max_images=64"]) == 0
    model, sde = gs.load_pretrained(tmp_path / "pipe")
    assert seen["x0"].shape == (64, 1, 8, 8) and len(seen["times"]) == 2
    assert seen["out"] == os.path.join(str(tmp_path / "pipe"), "diagnostics")
    assert torch.equal(seen["sde"].alphas_cumprod, sde.alphas_cumprod)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    with torch.no_grad():
        assert torch.equal(seen["model"](x, t), model(x, t))


def test_diagnose_pretrained_errors_are_one_line(tmp_path, capsys):
    # A folder without a model, or a model whose input is not the data's shape: exit code 2 and one line naming it.
    with pytest.raises(SystemExit) as e:
        main(["--config", DIGITS, "--pretrained", str(tmp_path)])
    assert e.value.code == 2 and "holds no model" in capsys.readouterr().err
    export_tiny(tmp_path / "rgb", in_channels=3)
    with pytest.raises(SystemExit) as e:
        main(["--config", DIGITS, "--pretrained", str(tmp_path / "rgb"), "data.max_images=16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "takes [B, 3, 8, 8]" in err and "[B, 1, 8, 8]" in err
