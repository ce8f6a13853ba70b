"""Sample grids and training-curve plots."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from getfast.io import make_grid, save_grid, save_images, to_uint8
from getfast.metrics.plots import _centred_mean, curves, plot_curves, read_jsonl


def test_to_uint8_rounding_and_clipping():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 1 / 127.5 - 1]).reshape(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 255, 255, 1]
    assert to_uint8(x.numpy()).shape == (1, 1, 6, 1)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        to_uint8(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        to_uint8(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_png_round_trip(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(7, channels, 5, 6, generator=g) * 2 - 1
    path = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3, pad=2)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    with Image.open(path) as im:
        assert im.mode == ("L" if channels == 1 else "RGB")
        back = np.asarray(im)
    if channels == 1:
        back = back[..., None]
    assert back.shape == (3 * (5 + 2) + 2, 3 * (6 + 2) + 2, channels)    # 3 rows of 3 (the last has one)
    u8 = to_uint8(imgs)
    for i in range(7):
        r, k = divmod(i, 3)
        y0, x0 = 2 + r * 7, 2 + k * 8
        np.testing.assert_array_equal(back[y0:y0 + 5, x0:x0 + 6], u8[i])
    assert (back[:2] == 0).all() and (back[-2:, 8:] == 0).all()             # padding and the empty cells
    assert np.array_equal(make_grid(imgs, nrow=3, pad=2), back)


def test_grid_default_square_and_errors(tmp_path):
    imgs = torch.zeros(10, 1, 4, 4)
    assert make_grid(imgs, pad=0).shape == (3 * 4, 4 * 4, 1)              # ceil(sqrt(10)) = 4 per row
    assert make_grid(imgs[:2], nrow=8, pad=0).shape == (4, 8, 1)          # nrow capped at n
    with pytest.raises(ValueError, match="empty"):
        make_grid(imgs[:0])
    with pytest.raises(ValueError, match="nrow"):
        make_grid(imgs, nrow=-1)


def test_save_images_writes_one_png_each(tmp_path):
    imgs = (np.arange(3 * 4 * 4) % 256).astype(np.uint8).reshape(3, 4, 4)
    paths = save_images(imgs, tmp_path / "f", start=5)
    assert [p.name for p in paths] == ["000005.png", "000006.png", "000007.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), imgs[1])
    rgb = save_images(torch.zeros(2, 3, 4, 4), tmp_path / "g")
    assert np.asarray(Image.open(rgb[0])).shape == (4, 4, 3)


def _write_log(path, records, torn_tail=False):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn_tail:
            f.write('{"step": 99, "loss": 0.')


def test_read_jsonl_and_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"step": s, "kimg": s / 10, "time": s, "img_per_s": 50.0, "loss": 1.0 / s, "aux": {"r": s}}
            for s in (1, 2, 3)]
    recs += [{"step": 2, "loss": 7.0}, {"step": 4, "fid": 30.0, "note": "eval"}]   # resumed at 2, then an eval line
    _write_log(log, recs, torn_tail=True)
    assert len(read_jsonl(log)) == 5
    series, xlabel = curves(read_jsonl(log))
    assert xlabel == "step" and list(series) == ["loss", "aux/r", "fid"]
    xs, ys = series["loss"]
    assert xs.tolist() == [1, 2, 3] and ys.tolist() == [1.0, 7.0, 1 / 3]        # last value per step wins
    assert series["fid"][0].tolist() == [4]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_plot_curves_png(tmp_path):
    log = tmp_path / "log.jsonl"
    rng = np.random.default_rng(0)
    _write_log(log, [{"step": s, "time": s * 0.1, "loss": float(np.exp(-s / 30) + 0.01 * rng.random()),
                      "grad_norm": 1.0 + rng.random()} for s in range(1, 200)])
    out = plot_curves(log, tmp_path / "plots" / "curves.png", smooth=10, title="demo")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 200
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5                                                      # something was drawn
    one = plot_curves(log, tmp_path / "loss.png", keys="loss", x="time", logy=True)
    assert Image.open(one).size[0] < im.size[0]                               # one panel is narrower than two


def test_plot_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    log = tmp_path / "log.jsonl"
    _write_log(log, [{"step": 1, "time": 0.5}])
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_curves(log, tmp_path / "x.png")
    with pytest.raises(ValueError, match="nope"):
        plot_curves(log, tmp_path / "x.png", keys=["nope"])
    assert not (tmp_path / "x.png").exists()


def test_centred_mean_has_no_lag():
    np.testing.assert_allclose(_centred_mean(np.arange(6.0), 3), [0.5, 1, 2, 3, 4, 4.5])
    np.testing.assert_allclose(_centred_mean(np.full(5, 2.0), 4), np.full(5, 2.0))
