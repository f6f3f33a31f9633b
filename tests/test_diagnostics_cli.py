"""``python -m gradscore_train.diagnose`` end to end: a tiny toy run trained for a few steps, then the CLI's
``main``."""
import json

from gradscore_train.diagnose import main as diagnose_main


def test_cli_on_tiny_trained_toy(tmp_path, capsys):
    from gradscore_train.train import main as train_main

    run = tmp_path / "run"
    small = ["model.hidden=16", "model.depth=2", "train.batch_size=64", "train.warmup_steps=1",
             "eval.num_samples=64", "eval.sample_steps=10", "eval.diag_samples=64", "eval.diag_times=[0.5]"]
    assert train_main(["--config", "configs/toy/l2.yaml", "--output-dir", str(run), "--max-steps", "4",
                       "--no-progress", *small]) in (0, None)
    out = tmp_path / "diag"
    capsys.readouterr()
    assert diagnose_main(["--config", "configs/toy/l2.yaml", "--checkpoint", str(run), "--out", str(out),
                          "--num-data", "256", "--num-times", "3", *small]) == 0
    printed = capsys.readouterr().out                       # the CLI prints the bounds it computed as JSON
    res = {"bounds": json.loads(printed[: printed.rindex("}") + 1])}
    on_disk = json.loads((out / "diagnostics.json").read_text())
    likelihood = {k: on_disk[k] for k in ("nll_nats", "bits_per_dim") if k in on_disk}
    assert {**on_disk["bounds"], **likelihood} == json.loads(json.dumps(res["bounds"]))
    assert likelihood["nll_nats"]["num_data"] > 0                  # toy: the model's NLL in nats
    assert len(on_disk["per_time"]) == 3 and on_disk["bounds"]["prior"]["kind"] == "exact"   # toy: exact log p_T
    # an untrained model: the L2 (Girsanov) bound dominates the gradient bound, both above the prior term
    b = on_disk["bounds"]
    assert b["prior"]["value"] < b["gradient"]["value"] <= b["girsanov"]["value"]
    assert (out / "diagnostics.png").stat().st_size > 1000


def test_cli_names_a_missing_checkpoint_in_one_line(capsys):
    """A bad checkpoint path gives one message naming it and exit code 2, not a traceback."""
    import pathlib

    import pytest

    from gradscore_train.diagnose import main
    with pytest.raises(SystemExit) as exit_info:
        config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "toy" / "l2.yaml"
        main(["--config", str(config), "--checkpoint", "/nonexistent/run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "/nonexistent/run" in err and "Traceback" not in err


def test_cli_names_a_checkpoint_that_does_not_fit_the_config(tmp_path, capsys):
    """A checkpoint trained with other overrides (a narrower MLP) than the config given: exit code 2 and
    one message naming the checkpoint's weights and its own config.yaml, not a state-dict traceback."""
    import pytest

    from gradscore_train.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--config", "configs/toy/l2.yaml", "--output-dir", str(run), "--max-steps", "1", "--no-progress",
                       "model.hidden=16", "train.batch_size=16", "eval.quality=false", "eval.num_samples=8",
                       "eval.sample_steps=2", "eval.diag_samples=16", "eval.diag_times=[0.5]"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        diagnose_main(["--config", "configs/toy/l2.yaml", "--checkpoint", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "score_model.safetensors does not fit the model" in err and "config.yaml" in err and "Traceback" not in err


def test_cli_on_tiny_digits_checkpoint(tmp_path, capsys):
    """Images (8x8 digits, d = 64, a UNet): the CLI writes the gradient, solenoidal and L2 parts per time, both
    bounds and bits/dim (17 levels), all finite; the gradient-only bound is at most Girsanov's (both are built from
    the same decomposition, the gradient integrand capped by the L2 one)."""
    import math

    from gradscore_train.train import main as train_main

    run = tmp_path / "run"
    small = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "train.batch_size=16",
             "train.warmup_steps=1", "eval.quality=false", "eval.num_samples=8", "eval.sample_steps=2",
             "eval.diag_times=[]"]
    assert train_main(["--config", "configs/digits/l2.yaml", "--output-dir", str(run), "--max-steps", "2",
                       "--no-progress", *small]) in (0, None)
    out = tmp_path / "diag"
    capsys.readouterr()
    assert diagnose_main(["--config", "configs/digits/l2.yaml", "--checkpoint", str(run), "--out", str(out),
                          "--num-data", "64", "--num-times", "2", "--num-points", "512", "--fit-steps", "50",
                          "--likelihood-samples", "4", "--solenoidal-points", "128", *small]) == 0
    on_disk = json.loads((out / "diagnostics.json").read_text())
    assert len(on_disk["per_time"]) == 2
    # 512 points = 64 data x 8 noises; the solenoidal part on the first ceil(128 / 64) = 2 noises of each, so on a
    # quarter of the held-out points the estimates average over (the rest of the points fit the networks)
    for r in on_disk["per_time"]:
        assert 0 < r["num_points"] < 512 and 4 * r["solenoidal_points"] == r["num_points"], r
    for row in on_disk["per_time"]:
        assert all(math.isfinite(row[k]) for k in ("gradient", "solenoidal", "l2")), row
    b = on_disk["bounds"]
    assert math.isfinite(b["gradient"]["value"]) and b["gradient"]["value"] <= b["girsanov"]["value"]
    bpd = on_disk["bits_per_dim"]
    # dequantised bits/dim bound -log2 of a bin's probability (Jensen), so it is positive in expectation
    assert bpd["num_data"] == 4 and math.isfinite(bpd["value"]) and bpd["value"] > 0, bpd
