"""``LoopConfig.compile``: the whole step of a single-phase method is compiled; with Adam built ``fused=True`` (as
every method does when the CLI gets ``--compile``) the training result is eager's up to float rounding (on CPU, so
it is tested without a GPU); ``tf32``."""
import json

import pytest
import torch
from torch import nn

from getfast.train import LoopConfig, train
from getfast.train.distributed import tf32
from getfast.train.step import adam

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Regress:
    """y = W2·tanh(W1·x) fitted to a fixed linear map with Adam (one phase)."""

    ema_module = "net"
    product = "net.safetensors"
    grad_clip = 1.0
    calls = 0

    def __init__(self, fused=False):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 6))
        self.modules = {"net": self.net}
        self.optimizers = {"net": adam(self.net.parameters(), lr=1e-2, fused=fused)}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 6, generator=g)
        self.data = _Data(x, x @ torch.randn(6, 6, generator=g))

    def config(self):
        return {"method": "regress"}

    def product_metadata(self):
        return {}

    def setup(self, wrap):
        self.model = wrap(self.net)

    def losses(self, batch, step):
        x, y = batch
        return {"net": (self.model(x) - y).square().mean()}


class _Data:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def _run(tmp_path, compile):
    m = Regress(fused=compile)
    cfg = LoopConfig(out=str(tmp_path), kimg=0.64, batch=32, warmup_kimg=0, log_every=5, ckpt_every=20, grid_n=0,
                     progress=False, device="cpu", compile=compile)
    train(m, cfg)
    log = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return m, log


def test_compiled_step_with_fused_adam_matches_eager(tmp_path):
    eager, log_e = _run(tmp_path / "eager", False)
    comp, log_c = _run(tmp_path / "compiled", True)
    assert comp.optimizers["net"].param_groups[0]["fused"] is True
    assert eager.optimizers["net"].param_groups[0]["fused"] in (None, False)
    assert log_c[-1] < 0.5 * log_c[0]  # it trains
    assert log_c == pytest.approx(log_e, rel=1e-3, abs=1e-5)
    for a, b in zip(eager.net.parameters(), comp.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_adam_is_fused_only_when_asked():
    p = [nn.Parameter(torch.randn(4))]
    assert adam(p, fused=True).defaults["fused"] is True
    assert adam(p).defaults["fused"] is None  # torch's own default (foreach on CUDA), not an explicit False
    w = adam(p, decoupled=True, weight_decay=0.1, fused=True)
    assert type(w) is torch.optim.AdamW and w.defaults["fused"] is True


@pytest.mark.parametrize("command", [["train-teacher"], ["distill", "sim"]])
def test_cli_compile_builds_fused_optimizers(command, monkeypatch, tmp_path):
    """``--compile`` reaches the methods' optimizers (the loop no longer switches them itself)."""
    import getfast.train.loop as loop
    from getfast import cli
    seen = []
    monkeypatch.setattr(loop, "fit", lambda method, cfg, **_: seen.append(method) or None)
    teacher = _tiny_teacher(tmp_path) if command[0] == "distill" else None
    extra = ["--teacher", teacher] if teacher else ["--data", "digits", "--model", "UNet-XS", "--resolution", "8"]
    for flag, want in (("--compile", True), ("--no-compile", None)):
        assert cli.main(command + extra + [flag, "--device", "cpu", "--out", str(tmp_path / f"run{flag}")]) == 0
        groups = [g for o in seen[-1].optimizers.values() for g in o.param_groups]
        assert groups and all(g["fused"] is want for g in groups), (flag, [g["fused"] for g in groups])


def _tiny_teacher(tmp_path):
    from getfast.teacher import build_denoiser, export
    path = tmp_path / "teacher.safetensors"
    export(build_denoiser("UNet-XS", 8, 1, 0), {"model": "UNet-XS", "resolution": 8, "channels": 1,
                                                "num_classes": 0, "label_dropout": 0.0}, path)
    return str(path)


def test_tf32_setting_applies_to_cuda_only_and_is_restored():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with tf32(torch.device("cpu"), True):
            assert not torch.backends.cuda.matmul.allow_tf32
        with tf32(torch.device("cuda", 0), True):  # only flags: no GPU is needed to set them
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    assert LoopConfig().tf32 is True
