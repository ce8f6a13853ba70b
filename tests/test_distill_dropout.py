"""Dropout of an imported teacher in the networks SIM and GDD train (issue 25, fidelity to the official codes).

EDM's CIFAR-10 networks carry dropout 0.13, and an imported pickle keeps it. SiD's loop (mingyuanzhou/SiD,
training/sid_training_loop.py) draws the fake-score step's generator samples with the generator in eval mode and
evaluates the fake score inside the generator loss in eval mode; GDD (Zyriix/GDD, train.sh) builds its generator
with --dropout=0. The fixtures are EDM pickles written by tests/test_importers_edm.py's EDM reference.
"""
import pytest
import torch

from getfast.importers import load_edm_pickle
from test_importers_edm import _make, _persistence_module, _write  # noqa: F401  (the fixture is autouse there)

pytestmark = pytest.mark.usefixtures("one_thread_module", "_persistence_module")

CASE = "edm-ddpmpp-cond-augment"  # EDMPrecond, SongUNet, 4 classes, dropout 0.13


def _teacher(tmp_path):
    D = load_edm_pickle(_write(tmp_path, _make(CASE)))
    assert any(getattr(m, "dropout", None) == 0.13 for m in D.modules())
    return D


def _record(module, store):
    return module.register_forward_hook(lambda mod, args, out: store.append((args, out.detach().clone())))


def test_sim_runs_generator_samples_and_fake_score_without_dropout(tmp_path, monkeypatch):
    from getfast.methods.sim import SIMConfig, SIMMethod
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    m = SIMMethod(SIMConfig(), teacher=_teacher(tmp_path))
    m.setup(lambda mod: mod)
    gen, fake = m.modules["generator"], m.modules["fake"]
    gen_calls, fake_calls = [], []
    hooks = [_record(gen, gen_calls), _record(fake, fake_calls)]
    phases = m.losses(3, 0)
    fake_phase = next(phases)       # (a): one generator call (no_grad samples), one fake-score DSM call
    assert set(fake_phase) == {"fake"} and len(gen_calls) == 1 and len(fake_calls) == 1
    gen_phase = next(phases)        # (b): the generator's own call, then the fake score inside its loss
    assert set(gen_phase) == {"generator"} and len(gen_calls) == 2 and len(fake_calls) == 2
    for h in hooks:
        h.remove()
    assert gen.training and fake.training  # each is back in train mode for its own update
    gen.eval()
    fake.eval()
    with torch.no_grad():
        (z, labels), x_g = gen_calls[0]
        torch.testing.assert_close(gen(z, labels), x_g, rtol=0, atol=1e-6)   # the fake step's samples
        args, d_f = fake_calls[1]
        torch.testing.assert_close(fake(*args), d_f, rtol=0, atol=1e-6)      # D_ψ inside the generator loss


def test_gdd_generator_has_no_dropout(tmp_path):
    from getfast.methods.gdd import GDDConfig, GDDMethod

    class Data:
        num_classes = 4

        def __len__(self):
            return 8

        def batch(self, idx):
            g = torch.Generator().manual_seed(0)
            return torch.rand(len(idx), 3, 8, 8, generator=g) * 2 - 1, idx % 4

    teacher = _teacher(tmp_path)
    m = GDDMethod(GDDConfig(), teacher=teacher, data=Data(), log=None)
    gen = m.modules["generator"]
    assert gen.training
    z, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(gen(z, labels), gen(z, labels), rtol=0, atol=0)
    assert any(getattr(mod, "dropout", None) == 0.13 for mod in teacher.modules())  # the teacher is untouched
