"""GET's equilibrium: the normalised-state variant (``state="normalized"``) and the IFT backward solve's
tolerance and warning (issue 26)."""
import json

import pytest
import torch

from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod
from getfast.models import get as get_mod
from getfast.train.loop import LoopConfig, fit


def _get(**kw):
    torch.manual_seed(0)
    m = get_mod.build("GET-P/2", img_resolution=8, in_channels=1, **kw)
    with torch.no_grad():  # a non-trivial decoder (it is zero-initialised)
        m.final_layer.linear.weight.normal_(std=0.05)
    return m


def test_normalized_state_iterates_stay_normalised_and_decode_like_raw():
    m = _get(state="normalized", eval_iters=5)
    m.eval()
    x = torch.randn(3, 1, 8, 8)
    out, info = m(x, return_info=True)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    tokens, offsets = m.inject(x)
    u = m.normalize(torch.randn_like(tokens))
    fu = m.normalize(m.equilibrium_step(u, *offsets))
    # every state of the map is normalised per token, and N is idempotent (the map stays on its set)
    torch.testing.assert_close(fu.mean(-1), torch.zeros_like(fu.mean(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fu.var(-1, unbiased=False), torch.ones_like(fu.mean(-1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.normalize(fu), fu, atol=1e-5, rtol=0)
    # the decoder's own LayerNorm makes decode(N(z)) = decode(z): normalising loses nothing it reads
    z = 7.0 * torch.randn_like(tokens) + 3.0
    torch.testing.assert_close(m.decode(m.normalize(z)), m.decode(z), atol=1e-5, rtol=1e-5)


def test_raw_state_is_the_paper_default_and_unchanged():
    assert get_mod.CONFIGS["GET-N/2"].state == "raw"
    m = _get()
    m.eval()
    x = torch.randn(2, 1, 8, 8)
    tokens, offsets = m.inject(x)
    torch.manual_seed(1)
    z0 = torch.randn_like(tokens)
    out = m(x, z0=z0)
    z = z0
    for _ in range(m.config.eval_iters):  # fixed_point returns f of the lowest-residual iterate; here: plain f^k
        z = m.equilibrium_step(z, *offsets)
    assert out.shape == m.decode(z).shape
    with pytest.raises(ValueError, match="state"):
        get_mod.build("GET-P/2", img_resolution=8, in_channels=1, state="sphere")


def test_normalized_state_trains_with_every_gradient_mode():
    for grad, extra in (("unrolled", {}), ("phantom", {"train_solver_iters": 2}), ("ift", {"eval_iters": 3})):
        m = _get(state="normalized", grad=grad, **extra)
        m.train()
        states = m(torch.randn(2, 1, 8, 8))
        sum(s.square().mean() for s in states).backward()
        g = m.qkv_inj.weight.grad
        assert g is not None and torch.isfinite(g).all() and torch.count_nonzero(g) > 0, grad


def test_ift_backward_solve_runs_to_a_tolerance_by_default():
    cfg = get_mod.CONFIGS["GET-P/2"]
    assert cfg.ift_tol is not None and cfg.ift_tol > 0 and cfg.ift_max_iter >= 50
    with pytest.raises(ValueError, match="ift_tol"):
        get_mod.build("GET-P/2", img_resolution=8, in_channels=1, ift_tol=0.0)
    m = _get(grad="ift", eval_iters=3)
    m.train()
    m(torch.randn(2, 1, 8, 8))[0].square().mean().backward()
    assert set(m.ift_record) == {"converged", "rel_lowest"} and m.ift_record["converged"].shape == (2,)


class _Pairs:
    """In-memory noise/image pairs at 8×8 (the GET method's data contract)."""

    shape, num_classes = (1, 8, 8), 0

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.noise = torch.randn(n, 1, 8, 8, generator=g)
        self.image = torch.tanh(self.noise.flip(-1))

    def __len__(self):
        return len(self.noise)

    def batch(self, idx):
        return self.noise[idx], self.image[idx], None


def test_unconverged_ift_backward_is_logged_and_warned_once(tmp_path):
    # ift_max_iter is not a CLI option; a GET built with a cap of 1 iteration cannot reach the tolerance.
    cfg = GETDistillConfig(pairs="in-memory", model="GET-P/2", grad="ift", eval_iters=2, lr=1e-3)
    method = GETDistillMethod(cfg, data=_Pairs())
    student = method.modules["student"]
    student.config = type(student.config)(**{**student.config.__dict__, "ift_max_iter": 1, "ift_tol": 1e-9})
    fit(method, LoopConfig(out=str(tmp_path / "run"), kimg=0.032, batch=4, log_every=2, ckpt_every=100,
                           grid_every=0, progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    warnings = [r for r in records if "warning" in r]
    assert len(warnings) == 1 and "--grad ift" in warnings[0]["warning"]
    logged = [r["ift_unconverged"] for r in records if "ift_unconverged" in r]
    # the zero-initialised decoder sends no gradient at first (w = 0 solves at once); after that every solve misses
    assert logged and logged[-1] == 1.0


def test_converged_ift_backward_warns_nothing(tmp_path):
    cfg = GETDistillConfig(pairs="in-memory", model="GET-P/2", grad="ift", eval_iters=2, lr=1e-3,
                           state="normalized")
    method = GETDistillMethod(cfg, data=_Pairs())
    fit(method, LoopConfig(out=str(tmp_path / "run"), kimg=0.016, batch=4, log_every=2, ckpt_every=100,
                           grid_every=0, progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert not [r for r in records if "warning" in r]
    assert all(r["ift_unconverged"] == 0.0 for r in records if "ift_unconverged" in r)


def test_residual_measurement_of_exported_students(tmp_path):
    """docs/get_equilibrium.py on exported students: the raw GET's state grows while the normalised one stays on
    its set (‖N(z)‖² = tokens·width), and every recorded residual is what its definition says."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
    get_equilibrium = pytest.importorskip("get_equilibrium")
    for state in ("raw", "normalized"):
        cfg = GETDistillConfig(pairs="in-memory", model="GET-P/2", state=state, eval_iters=2)
        product = fit(GETDistillMethod(cfg, data=_Pairs()), LoopConfig(
            out=str(tmp_path / state), kimg=0.016, batch=4, log_every=2, ckpt_every=100, grid_every=0, progress=False))
        rec = get_equilibrium.residuals(str(product), iters=5, n=3)
        assert rec["state"] == state and [r["iter"] for r in rec["rows"]] == [1, 2, 3, 4, 5]
        assert all(r["abs"] > 0 and r["rel"] > 0 and r["norm_rel"] > 0 for r in rec["rows"])
        if state == "normalized":  # its states are normalised already: the two relative residuals coincide
            tokens_width = 16 * 64  # 8×8 at patch 2, width 64
            assert all(abs(r["state_norm"] ** 2 / tokens_width - 1) < 1e-3 for r in rec["rows"])
            assert all(abs(r["rel"] / r["norm_rel"] - 1) < 1e-3 for r in rec["rows"])


def test_fid_iters_measures_only_the_points_a_record_lacks(tmp_path, monkeypatch):
    """docs/get_equilibrium.py fid-iters: a table grows by its new points; a record of another protocol (n, ref,
    ref_n) is measured again, not mixed in."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs"))
    get_equilibrium = pytest.importorskip("get_equilibrium")
    import getfast.metrics.fid as fid
    cfg = GETDistillConfig(pairs="in-memory", model="GET-P/2", eval_iters=2)
    product = str(fit(GETDistillMethod(cfg, data=_Pairs()), LoopConfig(
        out=str(tmp_path / "run"), kimg=0.008, batch=4, log_every=2, ckpt_every=100, grid_every=0, progress=False)))
    calls = []

    def evaluate(sample_fn, ref, n, **kw):
        calls.append(n)
        return {"fid": 100.0 + len(calls)}
    monkeypatch.setattr(fid, "evaluate", evaluate)
    rec = get_equilibrium.fid_iters(product, [1, 2], ["fixed_point"], 3, "ref.npz", 5)
    assert len(calls) == 2 and rec["ref_n"] == 5
    grown = get_equilibrium.fid_iters(product, [1, 2, 4], ["fixed_point"], 3, "ref.npz", 5, previous=rec)
    assert len(calls) == 3 and [p["iters"] for p in grown["points"]] == [1, 2, 4]
    assert grown["points"][:2] == rec["points"]  # kept as measured
    other = get_equilibrium.fid_iters(product, [1], ["fixed_point"], 3, "ref.npz", 10, previous=grown)
    assert len(calls) == 4 and [p["iters"] for p in other["points"]] == [1]
