"""GET offline distillation (Geng et al. 2023): the loss and the config (the known-answer run is in
test_known_answer.py)."""
import pytest
import torch

from getfast.deq import fp_correction
from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod, pair_loss


def test_fixed_point_loss_weights_states():
    target = torch.zeros(2, 1, 4, 4)
    states = [torch.full_like(target, 1.0), torch.full_like(target, 2.0)]
    # weights γ^(n-1-k) = [0.8, 1], summed as official GET (torchdeq's fp_correction): 0.8·1 + 1·2
    torch.testing.assert_close(fp_correction(pair_loss, states, target, gamma=0.8), torch.full((2,), 2.8))
    assert torch.allclose(pair_loss(states[0], target, "pseudo_huber", c=0.0), torch.ones(2))
    with pytest.raises(ValueError, match="loss"):
        pair_loss(states[0], target, "l3")


def test_config_validation_and_official_defaults():
    cfg = GETDistillConfig()
    assert cfg.grad_clip == 0.0 and cfg.loss == "l1" and cfg.gamma == 0.8 and cfg.weight_decay == 0.0
    for bad in (dict(huber_c=-1.0), dict(gamma=float("nan")), dict(gamma=0.0), dict(lr=0.0), dict(grad_clip=-1.0),
                dict(loss="l3"), dict(solver="bogus"), dict(grad="magic"), dict(grad_steps=-1), dict(tau=1.5),
                dict(model="UNet-S"), dict(z_init="ones")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GETDistillConfig(**bad)
    with pytest.raises(ValueError, match="train_solver_iters"):
        GETDistillConfig(grad="phantom")  # phantom starts from a no-gradient solve
    with pytest.raises(ValueError, match="GET models only"):
        GETDistillConfig(model="ViT-N/4", tau=0.5)
    GETDistillConfig(grad="phantom", train_solver_iters=6, tau=0.5, solver="anderson")
    with pytest.raises(ValueError, match="GET models only"):
        GETDistillConfig(model="ViT-N/4", z_init="input")


def test_get_arch_options_reach_the_model():
    """--z-init (like --tau, --grad-steps) overrides the named GET config; empty keeps the paper's choice."""
    from getfast.methods.get_distill import build_student
    m = build_student(GETDistillConfig(model="GET-N/4", z_init="input", grad_steps=2), 28, 1, 0)
    assert m.config.z_init == "input" and m.config.grad_steps == 2
    assert build_student(GETDistillConfig(model="GET-N/4"), 28, 1, 0).config.z_init == "noise"
