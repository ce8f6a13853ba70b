"""Evaluation during training (getfast.metrics.train_eval): FID records in log.jsonl and fid.png, TensorBoard scalars,
the training itself unchanged by evaluating, and the CLI path with the real (bundled) Inception."""
import json

import numpy as np
import pytest
import torch

from getfast.train import LoopConfig, load_ema, train
from getfast.metrics.train_eval import EvalConfig, Evaluator

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _teacher():
    from getfast.teacher import build_denoiser
    torch.manual_seed(0)
    t = build_denoiser("UNet-XS", 8, 1, 10)
    torch.nn.init.normal_(t.backbone.out_conv.weight, std=0.1)
    t.meta = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.0,
              "data": "digits", "overrides": {}}
    return t.eval().requires_grad_(False)


def _fake_inception(x):
    """A tiny stand-in feature network: 4×4 average-pooled channels of the 299×299 input (48 features)."""
    return torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1)


def _sim(monkeypatch):
    from getfast.methods.sim import SIMConfig, SIMMethod
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    torch.manual_seed(0)
    return SIMMethod(SIMConfig(), teacher=_teacher())


def _loop(out, **kw):
    return LoopConfig(out=str(out), kimg=0.008, batch=2, log_every=1, ckpt_every=4, grid_n=0, progress=False,
                      device="cpu", **kw)


def test_fid_every_logs_fid_records_and_plots_them(tmp_path, monkeypatch):
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))
    tb = pytest.importorskip("tensorboard") is not None
    ev = Evaluator(EvalConfig(fid_every=0.004, fid_ref=str(ref), fid_n=8, fid_batch=4, tensorboard=tb),
                   extractor=_fake_inception)
    train(_sim(monkeypatch), _loop(tmp_path / "a"), evaluator=ev)
    recs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    fids = [r for r in recs if "fid" in r]
    assert [(r["step"], r["kimg"]) for r in fids] == [(2, 0.004), (4, 0.008)]  # every 0.004 kimg, the last too
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["fid_n"] == 8 for r in fids)
    assert len([r for r in recs if "loss_generator" in r]) == 4
    png = tmp_path / "a" / "fid.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    # Evaluating draws no training noise: the same run without it ends at the same EMA.
    train(_sim(monkeypatch), _loop(tmp_path / "b"))
    a, b = load_ema(tmp_path / "a")[0], load_ema(tmp_path / "b")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_config_errors():
    for kw, match in ((dict(fid_every=1.0), "needs --fid-ref"), (dict(fid_ref="fashion-mnist"), "only read with"),
                      (dict(fid_every=1.0, fid_ref="/nope.npz"), "no such file"), (dict(fid_n=1), "fid_n"),
                      (dict(fid_every=-1.0), "fid_every")):
        with pytest.raises(ValueError, match=match):
            EvalConfig(**kw)


@pytest.mark.slow  # 75 s on 2 shared cores: the Inception forward and the 2048-d matrix square root
def test_cli_fid_every_with_the_real_inception(tmp_path, capsys):
    """`getfast distill sim --fid-every --fid-ref stats.npz`: the bundled Inception against mu/sigma statistics
    (the format of clean-fid's and NVlabs/edm's reference files)."""
    from getfast.cli import main
    from getfast.teacher import export
    t = _teacher()
    teacher = tmp_path / "teacher.safetensors"
    export(t, t.meta, teacher)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048, np.float32), sigma=np.eye(2048, dtype=np.float32))
    out = tmp_path / "run"
    assert main(["distill", "sim", "--teacher", str(teacher), "--out", str(out), "--kimg", "0.004", "--batch", "2",
                 "--fid-every", "0.004", "--fid-ref", str(stats), "--fid-n", "4", "--fid-batch", "4",
                 "--device", "cpu", "--no-progress", "--grid-n", "0", "--log-every", "1"]) == 0
    fids = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"fid"' in x]
    assert len(fids) == 1 and fids[0]["kimg"] == 0.004 and fids[0]["fid"] > 0
    assert (out / "fid.png").exists()
    assert main(["distill", "sim", "--fid-every", "1", "--out", str(tmp_path / "x")]) == 2
    assert "needs --fid-ref" in capsys.readouterr().err
