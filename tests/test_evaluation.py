"""What a run evaluates besides its loss (gradscore_train/evaluation.py): the sample image grid."""
import pytest
import torch

from gradscore_train.evaluation import image_grid


def _grid_by_hand(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Oracle: a white canvas with image k pasted at cell (k // nrow, k % nrow), 1-pixel lines around."""
    x = ((images[: nrow * nrow].float().clamp(-1, 1) + 1) / 2).nan_to_num(0.0)
    n, C, H, W = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(C, rows * (H + 1) + 1, nrow * (W + 1) + 1)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[:, 1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = x[k]
    return grid


@pytest.mark.parametrize("n, channels, nrow", [(10, 3, 4), (16, 1, 4), (3, 1, 8), (70, 3, 8)])
def test_image_grid_places_every_image_in_its_cell(n, channels, nrow):
    """Exact (tolerance 0: only copies and the same elementwise scaling): a partial last row, a row
    shorter than nrow, more images than nrow^2 (the rest dropped), out-of-range values and a NaN."""
    images = 1.5 * torch.randn(n, channels, 5, 6, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0] = float("nan")
    grid = image_grid(images, nrow)
    assert torch.equal(grid, _grid_by_hand(images, nrow))


def test_score_diagnostics_passes_solenoidal_points_to_the_decomposition(monkeypatch):
    """eval.diag_solenoidal_points reaches the neural decomposition: at 256 points of 32 data (8 noises each), 64
    solenoidal points are the first 2 noises of every data point, a quarter of what each part averages over."""
    import gradscore.diagnostics as D
    from gradscore.sde import VPSDE
    from gradscore_train.evaluation import score_diagnostics

    seen, original = {}, D.decompose

    def spy(*args, **kw):
        out = original(*args, **kw)
        seen.update(options=kw["options"], extra=out["solenoidal"].extra)
        return out

    monkeypatch.setattr(D, "decompose", spy)
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    out = score_diagnostics(lambda x, t: -x, VPSDE(), x0, [0.5], num_points=256, fit_steps=5, solenoidal_points=64,
                            generator=torch.Generator().manual_seed(1))
    assert seen["options"] == {"steps": 5, "solenoidal_points": 64}
    assert 4 * seen["extra"]["solenoidal_points"] == seen["extra"]["num_points"]
    assert "diag/solenoidal_error/t=0.5" in out


def test_save_grid_repeats_pixels_to_a_visible_width(tmp_path):
    """save_grid: the image_grid with every pixel repeated an integer number of times until it is >= min_width wide
    (nearest neighbour: the upscaled grid subsampled at the factor is the grid itself)."""
    import matplotlib.image

    from gradscore_train.evaluation import save_grid

    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    small = image_grid(x, 8)[0]                                    # [19, 73]
    save_grid(x, str(tmp_path / "g.png"))
    img = torch.from_numpy(matplotlib.image.imread(tmp_path / "g.png")[..., 0].copy())
    assert tuple(img.shape) == (4 * 19, 4 * 73)
    assert torch.allclose(img[::4, ::4], small, atol=2 / 255)      # the gray colormap LUT and the 8-bit PNG
    save_grid(x, str(tmp_path / "g1.png"), min_width=1)
    assert matplotlib.image.imread(tmp_path / "g1.png").shape[:2] == (19, 73)
