"""The shared training loop and its checkpoints: atomic writes, checksums, exact resume, DDP equivalence.

In-process tests drive the loop with a toy method (a small MLP); the SIGKILL-resume and DDP tests run the
real ``getfast train-teacher`` command (UNet-XS on 8×8 digits) in subprocesses, as a user would.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from getfast.train import (EMA, CheckpointError, DivergenceError, LoopConfig, export_product, fit, load_checkpoint,
                           save_checkpoint, train)
from getfast.train.checkpoint import latest_good_checkpoint, list_checkpoints, prune_checkpoints
from getfast.train.rng import RunInfo, sample_generators

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # fixture in conftest.py


# ---------------------------------------------------------------------------------------------- a toy method

class ToyData:
    def __init__(self, n=40):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return (self.x[idx],)


class Toy:
    """Denoise 4-d vectors with an MLP; noise from the global RNG (so resume must restore RNG states)."""

    ema_module = "net"
    product = "toy.safetensors"
    grad_clip = 1.0

    def __init__(self, lr=0.05, const_loss=None):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        net.const = nn.Parameter(torch.full((3,), 0.1234567), requires_grad=False)  # never trained
        self.modules = {"net": net}
        self.optimizers = {"net": torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)}
        self.data = ToyData()
        self.lr, self.const_loss, self.lrs, self.steps = lr, const_loss, [], []

    def config(self):
        return {"method": "toy", "lr": self.lr}

    def product_metadata(self):
        return {"toy": "1"}

    def setup(self, wrap):
        self.net = wrap(self.modules["net"])

    def losses(self, batch, step):
        (x,) = batch
        self.lrs.append(self.optimizers["net"].param_groups[0]["lr"])
        self.steps.append(step)
        loss = ((self.net(x + 0.3 * torch.randn_like(x)) - x) ** 2).mean()
        if self.const_loss is not None:  # the logged value is the loss: make it a constant with the same gradient
            loss = loss - loss.detach() + self.const_loss
        return {"net": loss}

    def sample_grid(self, ema, n):
        return torch.tanh(ema(torch.randn(n, 4))).reshape(n, 1, 2, 2)


def loop(tmp_path, **kw):
    base = dict(out=str(tmp_path), kimg=0.06, batch=10, warmup_kimg=0, log_every=2, ckpt_every=3, grid_every=0,
                grid_n=4, progress=False, device="cpu")
    base.update(kw)
    return LoopConfig(**base)


def states_equal(a: dict, b: dict, atol=0.0):
    """Max abs difference over every tensor of two (nested) state dicts; asserts equal structure."""
    worst = 0.0
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        for k in a:
            worst = max(worst, states_equal(a[k], b[k]))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            worst = max(worst, states_equal(x, y))
    else:
        assert a == b, (a, b)
    return worst


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip_and_header(tmp_path):
    state = {"w": torch.arange(5.0), "meta": {"step": 3, "name": "x"}, "list": [1, 2.5, "a"]}
    p = tmp_path / "ckpt-000000003.pt"
    save_checkpoint(p, state)
    assert p.read_bytes().startswith(b"GETFAST-CKPT v1 ")
    back = load_checkpoint(p)
    assert torch.equal(back["w"], state["w"]) and back["meta"] == state["meta"] and back["list"] == state["list"]
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temp file left


_CRASH_WRITER = r"""
import os, signal, sys, torch
from getfast.train import checkpoint as ck
def die(*a, **k):  # the payload is written and fsynced, the process dies before the rename
    os.kill(os.getpid(), signal.SIGKILL)
ck.os.replace = die
ck.save_checkpoint(sys.argv[1], {"w": torch.full((1000,), 2.0)})
"""


def test_atomic_write_survives_crash_mid_write(tmp_path):
    p = tmp_path / "ckpt-000000010.pt"
    save_checkpoint(p, {"w": torch.full((1000,), 1.0)})
    good = p.read_bytes()
    r = subprocess.run([sys.executable, "-c", _CRASH_WRITER, str(p)], cwd=REPO, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    debris = [f for f in tmp_path.iterdir() if f != p]
    assert len(debris) == 1 and ".tmp" in debris[0].name  # the torn write is in a temp file ...
    assert p.read_bytes() == good  # ... and the good file was never replaced
    assert torch.equal(load_checkpoint(p)["w"], torch.full((1000,), 1.0))
    assert list_checkpoints(tmp_path) == [p]  # temp files are not checkpoints
    path, state = latest_good_checkpoint(tmp_path)
    assert path == p and state["w"][0] == 1.0
    prune_checkpoints(tmp_path, keep=2)  # the next save's prune removes the crashed write's debris
    assert [f.name for f in tmp_path.iterdir()] == [p.name]


def test_atomic_write_error_keeps_old_file(tmp_path, monkeypatch):
    from getfast.train import checkpoint as ck
    p = tmp_path / "ckpt-000000010.pt"
    save_checkpoint(p, {"w": torch.ones(3)})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(p, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(p)["w"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == [p.name]


def test_checksum_mismatch_refused(tmp_path):
    p = tmp_path / "ckpt-000000001.pt"
    save_checkpoint(p, {"w": torch.arange(100.0)})
    raw = bytearray(p.read_bytes())
    raw[-50] ^= 0x01  # one flipped bit in the payload
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{p.name} is corrupt: sha256"):
        load_checkpoint(p)
    p.write_bytes(bytes(raw[: len(raw) // 2]))  # torn file
    with pytest.raises(CheckpointError, match=p.name):
        load_checkpoint(p)
    p.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(CheckpointError, match=rf"{p.name} is not a getfast checkpoint"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    assert issubclass(CheckpointError, ValueError)  # the CLI reports it in one line, exit code 2


def test_streamed_checkpoint_keeps_the_v1_layout(tmp_path):
    """Checkpoints are streamed (never a second copy of the payload in memory) in the same layout as before: the
    header's digest is the sha256 of the rest; a file written in memory the old way still loads."""
    import hashlib
    import io as _io
    from getfast.train.checkpoint import MAGIC
    state = {"w": torch.randn(3001, dtype=torch.float64), "meta": {"step": 7, "name": "x"}}
    p = tmp_path / "ckpt-000000001.pt"
    save_checkpoint(p, state)
    raw = p.read_bytes()
    assert raw.startswith(MAGIC) and raw[len(MAGIC) + 64:len(MAGIC) + 65] == b"\n"
    assert raw[len(MAGIC):len(MAGIC) + 64] == hashlib.sha256(raw[len(MAGIC) + 65:]).hexdigest().encode()
    assert states_equal(load_checkpoint(p), state) == 0.0
    buf = _io.BytesIO()
    torch.save(state, buf)
    old = tmp_path / "ckpt-000000002.pt"
    old.write_bytes(MAGIC + hashlib.sha256(buf.getvalue()).hexdigest().encode() + b"\n" + buf.getvalue())
    assert states_equal(load_checkpoint(old), state) == 0.0


def test_latest_good_checkpoint_skips_corrupt_newest(tmp_path):
    old, new = tmp_path / "ckpt-000000010.pt", tmp_path / "ckpt-000000020.pt"
    save_checkpoint(old, {"step": 10})
    save_checkpoint(new, {"step": 20})
    raw = bytearray(new.read_bytes())
    raw[-3] ^= 0xFF
    new.write_bytes(bytes(raw))
    logs = []
    path, state = latest_good_checkpoint(tmp_path, log=logs.append)
    assert path == old and state["step"] == 10
    assert len(logs) == 1 and new.name in logs[0] and "corrupt" in logs[0]
    assert old.exists() and new.exists()  # nothing deleted
    # pruning after the resumed run's next save never deletes a good checkpoint to keep the corrupt one
    mid = tmp_path / "ckpt-000000015.pt"
    save_checkpoint(mid, {"step": 15})
    prune_checkpoints(tmp_path, keep=1, current_step=15)
    assert mid.exists() and new.exists() and not old.exists()
    assert latest_good_checkpoint(tmp_path, log=logs.append)[1]["step"] == 15


# ---------------------------------------------------------------------------------------------- loop (in-process)

def test_lr_warmup_applied(tmp_path):
    m = Toy(lr=0.05)
    train(m, loop(tmp_path, kimg=0.08, warmup_kimg=0.05))  # 8 steps of 10; warm-up over 50 images
    expect = [0.05 * min(1.0, 10 * k / 50) for k in range(8)]
    assert m.lrs == pytest.approx(expect, rel=1e-12, abs=0)
    assert m.lrs[0] == 0 and m.lrs[5] == 0.05


def test_ema_rampup_formula():
    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    ema = EMA(net)
    e0 = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, nimg=100, batch=10, halflife_kimg=500, rampup=0.05)  # half-life min(500k, 5) -> beta 1/4
    for e, old, p in zip(ema.module.parameters(), e0, net.parameters()):
        assert torch.allclose(e, 0.25 * old + 0.75 * p, atol=1e-6)
    ema2 = EMA(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema2.update(net, nimg=100, batch=10, halflife_kimg=0.01, rampup=0)  # no ramp-up: half-life 10 images
    for e, p in zip(ema2.module.parameters(), net.parameters()):
        assert torch.allclose(e, 0.5 * (p - 1) + 0.5 * p, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_in_loop_constant_and_tiny_halflife(tmp_path):
    m = Toy()
    train(m, loop(tmp_path / "a", kimg=0.05, ema_halflife_kimg=100.0, ema_rampup=0.05))
    ema = load_checkpoint(list_checkpoints(tmp_path / "a")[0])["ema"]
    assert torch.equal(ema["const"], torch.full((3,), 0.1234567))  # EMA of a constant stays exactly constant
    net = m.modules["net"].state_dict()
    assert not torch.equal(ema["0.weight"], net["0.weight"])  # a real average: lags the weights
    m = Toy()
    train(m, loop(tmp_path / "b", kimg=0.01, ema_halflife_kimg=1e-12, ema_rampup=0))  # one step
    ema = load_checkpoint(list_checkpoints(tmp_path / "b")[0])["ema"]
    for k, v in m.modules["net"].state_dict().items():
        assert torch.equal(ema[k], v), k  # half-life ~0: the EMA is the weights after one step


def test_log_jsonl_and_grid(tmp_path):
    m = Toy()
    rec = train(m, loop(tmp_path, kimg=0.07, log_every=2, grid_every=4, grid_n=9))  # 7 steps
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [2, 4, 6, 7]
    for r in recs:
        assert {"loss", "kimg", "img_per_s", "time", "step"} <= set(r)
        assert r["kimg"] == pytest.approx(r["step"] * 10 / 1000) and r["img_per_s"] > 0 and r["loss"] > 0
    assert rec == recs[-1]
    from PIL import Image
    for step in (4, 7):
        with Image.open(tmp_path / f"grid-{step:07d}.png") as im:
            assert im.size == (3 * 3 + 1, 3 * 3 + 1)  # 3x3 images of 2x2, 1-pixel padding
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["method"] == {"method": "toy", "lr": 0.05} and cfg["loop"]["batch"] == 10


def test_unknown_and_bad_config_options():
    with pytest.raises(TypeError):
        LoopConfig(learning_rate=1.0)
    from getfast.teacher import TeacherConfig
    with pytest.raises(TypeError):
        TeacherConfig(lr_schedule="cosine")
    for bad in (dict(log_every=0), dict(ckpt_every=0), dict(batch=0), dict(kimg=-1), dict(kimg=float("nan")),
                dict(device="tpu")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoopConfig(**bad)
    assert LoopConfig(kimg=0.57, batch=10).total_steps() == 57  # not 58 from 570.0000000000001 images


def test_resume_in_process_exact_and_corrupt_newest(tmp_path):
    ref = Toy()
    train(ref, loop(tmp_path / "ref", kimg=0.09, ckpt_every=3))
    ref_state = load_checkpoint(tmp_path / "ref" / "ckpt-000000009.pt")

    a = Toy()
    train(a, loop(tmp_path / "run", kimg=0.06, ckpt_every=3))  # ckpts 3 and 6
    p6 = tmp_path / "run" / "ckpt-000000006.pt"
    raw = bytearray(p6.read_bytes())
    raw[-10] ^= 0x40
    p6.write_bytes(bytes(raw))
    b = Toy()
    train(b, loop(tmp_path / "run", kimg=0.09, ckpt_every=3, resume=True))  # resumes from 3, not 6
    assert b.steps == list(range(3, 9))
    state = load_checkpoint(tmp_path / "run" / "ckpt-000000009.pt")
    for key in ("modules", "ema", "optimizers", "loop"):
        assert states_equal(state[key], ref_state[key]) == 0.0, key
    # the log reads as one run: records after the resumed step were dropped and redone
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 9]


def test_log_average_after_resume(tmp_path):
    train(Toy(const_loss=1.0), loop(tmp_path, kimg=0.06, ckpt_every=3, log_every=4))
    train(Toy(const_loss=1.0), loop(tmp_path, kimg=0.08, ckpt_every=3, log_every=4, resume=True))
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [4, 6, 8]
    assert all(r["loss"] == 1.0 for r in recs), recs  # a mean of ones, whatever the number of steps averaged


def test_config_mismatch_on_resume_refused(tmp_path):
    train(Toy(lr=0.05), loop(tmp_path, kimg=0.03))
    with pytest.raises(CheckpointError, match=r"ckpt-000000003\.pt was written by a different configuration.*'lr'"):
        train(Toy(lr=0.01), loop(tmp_path, kimg=0.06, resume=True))
    with pytest.raises(CheckpointError, match=r"ckpt-000000003\.pt.*different loop settings.*'seed'"):
        train(Toy(lr=0.05), loop(tmp_path, kimg=0.06, resume=True, seed=1))
    with pytest.raises(CheckpointError, match=r"'batch'"):
        train(Toy(lr=0.05), loop(tmp_path, kimg=0.06, resume=True, batch=5))
    train(Toy(lr=0.05), loop(tmp_path, kimg=0.06, resume=True))  # same settings, longer: fine
    assert list_checkpoints(tmp_path)[0].name == "ckpt-000000006.pt"


def test_resume_accepts_an_option_added_later_at_its_default(tmp_path):
    """A checkpoint from before an option existed resumes when the run keeps that option at its default."""
    from dataclasses import asdict, dataclass

    @dataclass
    class Cfg:
        lr: float = 0.05
        new_option: str = "old-behaviour"

    class Later(Toy):
        def __init__(self, **cfg):
            self.cfg = Cfg(**cfg)
            super().__init__(lr=self.cfg.lr)

        def config(self):
            return {"method": "toy", **asdict(self.cfg)}

    train(Toy(lr=0.05), loop(tmp_path, kimg=0.03))  # its config has no "new_option"
    with pytest.raises(CheckpointError, match=r"different configuration.*'new_option': \(None, 'other'\)"):
        train(Later(new_option="other"), loop(tmp_path, kimg=0.06, resume=True))
    with pytest.raises(CheckpointError, match=r"different configuration.*'lr'"):
        train(Later(lr=0.01), loop(tmp_path, kimg=0.06, resume=True))
    resumed = Later()
    train(resumed, loop(tmp_path, kimg=0.06, resume=True))
    assert resumed.steps == [3, 4, 5]


def test_warm_start_from_an_exported_product(tmp_path):
    """--warm-start: the product module and its EMA start from an exported student (here: trained, then continued
    at lr 0, so the new export must be those weights exactly); a file that is missing, damaged or of another
    network is one ValueError before the run folder exists; a resume restores its checkpoint instead."""
    first = fit(Toy(), loop(tmp_path / "a"))
    from getfast.weights import read_weights
    warm, _ = read_weights(first)
    second = fit(Toy(lr=0.0), loop(tmp_path / "b", warm_start=str(first)))
    got, _ = read_weights(second)
    assert states_equal(got, warm) == 0.0
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["loop"]["warm_start"] == str(first)
    fresh, _ = read_weights(fit(Toy(lr=0.0), loop(tmp_path / "c")))
    assert states_equal(fresh, warm) > 0  # without it the run starts from the method's own initialisation

    other = Toy()
    other.modules["net"][2] = nn.Linear(16, 5)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(first.read_bytes()[:-3] + b"xyz")
    for path, match in ((tmp_path / "none.safetensors", "is not a file"), (bad, "damaged or was altered")):
        with pytest.raises(ValueError, match=match):
            train(Toy(), loop(tmp_path / "d", warm_start=str(path)))
    with pytest.raises(ValueError, match=r"do not fit the student this run trains: 2 tensor\(s\) differ in shape"):
        train(other, loop(tmp_path / "d", warm_start=str(first)))
    assert not (tmp_path / "d").exists()

    ends = []
    for name, warm_arg in (("e", str(first)), ("f", "")):  # a resume continues its checkpoint, warm start or not
        train(Toy(), loop(tmp_path / name, kimg=0.03))
        train(Toy(), loop(tmp_path / name, kimg=0.06, resume=True, warm_start=warm_arg))
        ends.append(read_weights(export_product(Toy(), loop(tmp_path / name)))[0])
    assert states_equal(*ends) == 0.0


def test_loop_config_ranges():
    for bad, name in ((dict(grid_every=-1), "grid_every"), (dict(seed=-1), "seed"), (dict(kimg=float("inf")), "kimg"),
                      (dict(batch=1.5), "batch"), (dict(ema_rampup=float("nan")), "ema_rampup"),
                      (dict(bf16="maybe"), "bf16"), (dict(progress="no"), "progress"), (dict(out=""), "out"),
                      (dict(device="cuda:x"), "device"), (dict(warmup_kimg=-1.0), "warmup_kimg")):
        with pytest.raises(ValueError, match=name):
            LoopConfig(**bad)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        LoopConfig(resume=True, overwrite=True)
    assert LoopConfig(bf16=None).bf16 is None and LoopConfig(bf16=False).bf16 is False


def test_fresh_run_into_an_earlier_run_is_refused(tmp_path):
    train(Toy(), loop(tmp_path, kimg=0.03))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=rf"{tmp_path}.*--resume.*--overwrite.*new --out"):
        train(Toy(), loop(tmp_path, kimg=0.02, seed=7))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    # --overwrite replaces it: only the new run's checkpoints and log remain, and its product is exported
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "toy.safetensors").write_bytes(b"an old export")
    m = Toy()
    path = fit(m, loop(tmp_path, kimg=0.02, seed=7, overwrite=True))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000002.pt"]
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [2]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
    from safetensors.torch import load_file
    ema = load_checkpoint(tmp_path / "ckpt-000000002.pt")["ema"]
    exported = load_file(str(path))
    assert path == tmp_path / "toy.safetensors" and exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert path.stat().st_mode & 0o777 == 0o644  # exported weights are meant to be shared, like teachers


_LOCK_HOLDER = r"""
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write("pid 4242\n"); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_run_into_a_locked_folder_is_refused(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(tmp_path / ".getfast.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{tmp_path} is in use by another training run \(pid 4242\)"):
            train(Toy(), loop(tmp_path, kimg=0.01))
        assert not list_checkpoints(tmp_path) and not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train(Toy(), loop(tmp_path, kimg=0.01))  # the lock died with its process
    assert list_checkpoints(tmp_path)


class NaNAt(Toy):
    """The loss turns NaN from step ``at`` (0-based) on."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def losses(self, batch, step):
        out = super().losses(batch, step)
        return {"net": out["net"] * (float("nan") if step >= self.at else 1.0)}


def test_non_finite_loss_stops_training_naming_step_and_option(tmp_path):
    with pytest.raises(DivergenceError, match=r"step 4: the loss of 'net'.*lr \(--lr\) = 0.05.*--grad-clip is 1"):
        train(NaNAt(3), loop(tmp_path, kimg=0.1, log_every=2, ckpt_every=3))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000003.pt"]  # nothing after the bad step
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in the log"))["step"] for x in lines] == [2]
    assert issubclass(DivergenceError, ValueError)  # the CLI reports it in one line


class TwoNets:
    """Two optimizers whose losses each involve both networks: A's update must not touch B, and the second phase
    must see the first phase's update."""

    ema_module = "a"
    product = "a.safetensors"
    grad_clip = 0.0
    data = None

    def __init__(self):
        torch.manual_seed(0)
        self.modules = {"a": nn.Linear(3, 3), "b": nn.Linear(3, 1)}
        self.optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in self.modules.items()}
        self.seen = []

    def config(self):
        return {"method": "two"}

    def product_metadata(self):
        return {}

    def setup(self, wrap):
        pass

    def losses(self, n, step):
        a, b = self.modules["a"], self.modules["b"]
        x = torch.randn(n, 3)
        before = {k: p.detach().clone() for k, p in b.named_parameters()}
        yield {"a": b(a(x)).square().mean(), "note": torch.tensor(1.0)}
        assert all(torch.equal(p, before[k]) for k, p in b.named_parameters()), "A's step changed B"
        assert all(p.grad is None for p in b.parameters()), "A's loss left gradients in B"
        self.seen.append(a.weight.detach().clone())
        yield {"b": b(a(x).detach()).mean()}


def test_phases_update_only_their_own_optimizer(tmp_path):
    m = TwoNets()
    w0 = m.modules["a"].weight.detach().clone()
    rec = train(m, loop(tmp_path, kimg=0.02, log_every=1))
    assert not torch.equal(m.seen[0], w0)  # the second phase ran after A's step
    assert {"loss_a", "loss_b", "note"} <= set(rec) and rec["note"] == 1.0


def test_an_object_that_is_not_a_method_is_refused(tmp_path):
    class OldStyle:
        modules, optimizers, ema_module, data = {"net": nn.Linear(2, 2)}, {}, "net", None

        def config(self):
            return {}

        def setup(self, wrap):
            pass

        def step(self, batch, step):  # the update is the loop's: a method only gives its losses
            pass
    with pytest.raises(ValueError, match="OldStyle is not a training method: it lacks losses"):
        train(OldStyle(), loop(tmp_path, kimg=0.01))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_loss_for_a_missing_optimizer_is_an_error(tmp_path):
    class Typo(Toy):
        def losses(self, batch, step):
            return {"nett": super().losses(batch, step)["net"]}
    with pytest.raises(ValueError, match="'nett' with a gradient but there is no optimizer"):
        train(Typo(), loop(tmp_path, kimg=0.01))


def test_grad_clip_bounds_the_step_and_negative_is_refused(tmp_path):
    class SGDToy(Toy):
        grad_clip = 0.01

        def __init__(self):
            super().__init__()
            self.optimizers = {"net": torch.optim.SGD([p for p in self.modules["net"].parameters() if p.requires_grad],
                                                      lr=1.0)}

    m = SGDToy()
    w0 = torch.cat([p.detach().flatten().clone() for p in m.modules["net"].parameters() if p.requires_grad])
    train(m, loop(tmp_path / "a", kimg=0.01))  # one step of SGD with lr 1: the step is the clipped gradient
    w1 = torch.cat([p.detach().flatten() for p in m.modules["net"].parameters() if p.requires_grad])
    assert 0.009 < float((w1 - w0).norm()) <= 0.01 + 1e-6
    bad = Toy()
    bad.grad_clip = -1.0
    with pytest.raises(ValueError, match="grad_clip"):
        train(bad, loop(tmp_path / "b", kimg=0.01))


def test_autocast_covers_the_forward_only(tmp_path):
    class Watch(Toy):
        def __init__(self):
            super().__init__()
            self.forward_autocast, self.step_autocast = [], []
            self.optimizers["net"].register_step_pre_hook(
                lambda *_: self.step_autocast.append(torch.is_autocast_enabled("cpu")))

        def losses(self, batch, step):
            self.forward_autocast.append(torch.is_autocast_enabled("cpu"))
            return super().losses(batch, step)

    m = Watch()
    train(m, loop(tmp_path, kimg=0.02, bf16=True))
    assert m.forward_autocast == [True, True] and m.step_autocast == [False, False]


def test_sample_generators_split_across_ranks():
    one = sample_generators(RunInfo(seed=3, batch=8, rank=0, world=1), step=5)
    two = [g for r in range(2) for g in sample_generators(RunInfo(seed=3, batch=8, rank=r, world=2), step=5)]
    a = torch.stack([torch.randn(6, generator=g) for g in one])
    b = torch.stack([torch.randn(6, generator=g) for g in two])
    assert torch.equal(a, b)
    other_step = torch.stack([torch.randn(6, generator=g) for g in sample_generators(RunInfo(3, 8, 0, 1), 6)])
    other_seed = torch.stack([torch.randn(6, generator=g) for g in sample_generators(RunInfo(4, 8, 0, 1), 5)])
    assert not torch.equal(a, other_step) and not torch.equal(a, other_seed)
    assert len({tuple(r.tolist()) for r in a}) == 8  # every sample its own noise


# ---------------------------------------------------------------------------------------------- CLI subprocess runs

def teacher_cmd(out, kimg, extra=()):
    return ["train-teacher", "--data", "digits", "--model", "UNet-XS", "--resolution", "8", "--batch", "16",
            "--kimg", str(kimg), "--cond", "--label-dropout", "0.3", "--lr", "2e-3", "--warmup-kimg", "0.3",
            "--ema-halflife-kimg", "0.2", "--seed", "7", "--log-every", "5", "--ckpt-every", "5",
            "--grid-every", "0", "--grid-n", "4", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def env1():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "getfast.cli", *args], cwd=REPO, env=env1(), capture_output=True,
                          text=True, **kw)


def final_state(run: Path):
    return load_checkpoint(list_checkpoints(run)[0])


KIMG, STEPS = 0.8, 50  # 50 steps of 16 digits, checkpoints every 5


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted 1-process run, shared by the resume and DDP tests; started in the background so
    that it overlaps with the first test's own runs."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.Popen([sys.executable, "-m", "getfast.cli", *teacher_cmd(out, KIMG)], cwd=REPO, env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return out

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigkill_resume_is_exact(tmp_path, reference_run):
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "getfast.cli", *teacher_cmd(run, KIMG)], cwd=REPO, env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = list_checkpoints(run)
        if ck and int(ck[0].name[5:14]) >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(list_checkpoints(run)[0].name[5:14])
    assert 10 <= killed_at < STEPS and not (run / "teacher.safetensors").exists()

    r = cli(teacher_cmd(run, KIMG, ["--resume"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    full = reference_run()
    a, b = final_state(full), final_state(run)
    assert a["loop"]["step"] == b["loop"]["step"] == STEPS
    diffs = {k: states_equal(a[k], b[k]) for k in ("modules", "ema", "optimizers")}
    print("max |uninterrupted - resumed| after SIGKILL at step", killed_at, diffs)
    assert all(d <= 1e-6 for d in diffs.values()), diffs
    assert states_equal(a["rng"], b["rng"]) == 0
    # the per-step losses of the resumed run's log match the uninterrupted run's
    la = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in la] == [x["step"] for x in lb] == list(range(5, STEPS + 1, 5))
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], rel=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, reference_run):
    """2 gloo processes (global batch 16 = 2 × 8) vs 1 process (batch 16): same data rows, same per-sample
    noise, σ and label dropout (drawn from each sample's global position), gradients averaged by DDP.
    Only float summation order differs (mean of two half-batch means vs one mean; conv batch sizes)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "getfast.cli", *teacher_cmd(tmp_path / "two", KIMG)],
                       cwd=REPO, env=env1(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one = reference_run()
    a, b = final_state(one), final_state(tmp_path / "two")
    assert a["loop"]["step"] == b["loop"]["step"] == STEPS and b["loop"]["world"] == 2 and len(b["rng"]) == 2
    diffs = {k: states_equal(a[k], b[k]) for k in ("modules", "ema")}
    # the tolerance means something: training moved the weights far more than that
    from getfast.teacher import TeacherConfig, TeacherMethod
    init = TeacherMethod(TeacherConfig(data="digits", model="UNet-XS", resolution=8, cond=True, label_dropout=0.3))
    moved = states_equal(a["modules"]["net"], init.modules["net"].state_dict())
    print(f"max |1 process - 2 processes| after {STEPS} steps: {diffs}; max |trained - initial| {moved:.3f}")
    assert moved > 0.05
    assert all(d <= 2e-5 for d in diffs.values()), diffs
    la = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == STEPS // 5
    assert la == pytest.approx(lb, rel=1e-4)  # the logged loss is the mean over both ranks


def test_resume_on_other_data_refused(tmp_path):
    """A method with stored data (GET's pairs) fingerprints it in each checkpoint; continuing on a grown or
    regenerated set under the same path is refused, the same data resumes, a checkpoint without one is trusted."""
    class Fingerprinted(Toy):
        def __init__(self, fp, **kw):
            super().__init__(**kw)
            self.fp = fp

        def data_fingerprint(self):
            return self.fp

    train(Fingerprinted({"pairs": 40, "sha256": "a"}), loop(tmp_path, kimg=0.03))
    with pytest.raises(CheckpointError, match=r"trained on different data.*'pairs': 40.*'pairs': 80"):
        train(Fingerprinted({"pairs": 80, "sha256": "b"}), loop(tmp_path, kimg=0.06, resume=True))
    train(Fingerprinted({"pairs": 40, "sha256": "a"}), loop(tmp_path, kimg=0.06, resume=True))
    old = tmp_path / "old"
    train(Toy(), loop(old, kimg=0.03))  # written without a fingerprint
    train(Fingerprinted({"pairs": 80, "sha256": "b"}), loop(old, kimg=0.06, resume=True))


def test_resume_refuses_a_teacher_whose_weights_changed(tmp_path):
    """A frozen network read from a path (teacher, a round's --init) is read again on resume; when the file or
    run folder behind the path changed since the run started, the resume is refused naming the option; the same
    weights resume; a checkpoint written without digests is trusted."""
    class Taught(Toy):
        def __init__(self, teacher_bias):
            super().__init__()
            self.teacher = nn.Linear(4, 4)
            nn.init.constant_(self.teacher.bias, teacher_bias)

        def frozen(self):
            return {"teacher": self.teacher}

    train(Taught(0.5), loop(tmp_path, kimg=0.03))
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(CheckpointError, match=r"other weights than teacher \(--teacher\) holds now"):
        train(Taught(0.25), loop(tmp_path, kimg=0.06, resume=True))
    assert (tmp_path / "config.json").read_text() == before
    train(Taught(0.5), loop(tmp_path, kimg=0.06, resume=True))
    old = tmp_path / "old"
    train(Toy(), loop(old, kimg=0.03))  # written without digests
    train(Taught(0.25), loop(old, kimg=0.06, resume=True))


def test_resume_refuses_a_changed_schedule_or_a_shorter_kimg(tmp_path):
    """Issue 27: --warmup-kimg, --ema-halflife-kimg and --ema-rampup shape the run like --lr does: a resume with
    another value is refused (naming the option) and config.json is not rewritten; a --kimg below what the
    checkpoint has trained is refused instead of exporting the later checkpoint."""
    train(Toy(), loop(tmp_path, kimg=0.03))
    before = (tmp_path / "config.json").read_text()
    for key, value, flag in (("warmup_kimg", 1.0, "--warmup-kimg"), ("ema_halflife_kimg", 1.0, "--ema-halflife-kimg"),
                             ("ema_rampup", 0.2, "--ema-rampup")):
        with pytest.raises(CheckpointError, match=flag):
            train(Toy(), loop(tmp_path, kimg=0.06, resume=True, **{key: value}))
        assert (tmp_path / "config.json").read_text() == before
    with pytest.raises(CheckpointError, match=r"trained 0\.03 kimg, more than --kimg 0\.01"):
        train(Toy(), loop(tmp_path, kimg=0.01, resume=True))
    assert (tmp_path / "config.json").read_text() == before
    train(Toy(), loop(tmp_path, kimg=0.06, resume=True))  # the same settings resume


def test_identical_pair_set_moved_elsewhere_resumes(tmp_path):
    """Issue 27: an option that only says where stored data is (GET's --pairs) may change on resume when the
    data's fingerprint is the same; another fingerprint is still refused."""
    class Located(Toy):
        data_location_options = ("pairs",)

        def __init__(self, where, fp):
            super().__init__()
            self.where, self.fp = where, fp

        def config(self):
            return {**super().config(), "pairs": self.where}

        def data_fingerprint(self):
            return self.fp

    fp = {"pairs": 40, "sha256": "a"}
    train(Located("/old/place", fp), loop(tmp_path, kimg=0.03))
    with pytest.raises(CheckpointError, match="refusing to resume"):
        train(Located("/new/place", {"pairs": 40, "sha256": "b"}), loop(tmp_path, kimg=0.06, resume=True))
    train(Located("/new/place", fp), loop(tmp_path, kimg=0.06, resume=True))

    class Unmovable(Toy):  # no data_location_options: its options must match as before
        def config(self):
            return {**super().config(), "pairs": "/elsewhere"}

        def data_fingerprint(self):
            return fp
    with pytest.raises(CheckpointError, match="different configuration"):
        train(Unmovable(), loop(tmp_path, kimg=0.09, resume=True))
