"""The EDM UNet backbone: sizes, odd resolutions, conditioning, torch.compile."""
import pytest
import torch

from getfast.diffusion import EDMLoss, EDMPrecond, heun
from getfast.models import create, known_models


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_ddpmpp_matches_edm_cifar10_size():
    with torch.device("meta"):
        m = create("UNet-DDPMpp", 32, 3)
    assert abs(_params(m) - 55.73e6) / 55.73e6 < 0.005  # EDM's DDPM++ CIFAR-10: 55.7M


@pytest.mark.parametrize("res", [8, 28, 32])
def test_unet_shapes_odd_and_even(res):
    net = EDMPrecond(create("UNet-XS", res, 1, num_classes=10))
    x = torch.randn(2, 1, res, res)
    out = net(x, torch.tensor([0.5, 3.0]), torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_s_fashion_mnist_size_and_attention():
    m = create("UNet-S", 28, 1, num_classes=10)
    assert 1.5e6 < _params(m) < 2.5e6
    assert any(n.endswith(".qkv.weight") for n, _ in m.named_parameters())


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="UNet-S"):
        create("UNet-ZZ")
    assert "UNet-S" in known_models()


def test_w_cond_student_starts_as_teacher():
    torch.manual_seed(0)
    t = EDMPrecond(create("UNet-XS", 8, 1, num_classes=3))
    s = EDMPrecond(create("UNet-XS", 8, 1, num_classes=3, w_cond=True))
    missing = s.load_state_dict(t.state_dict(), strict=False)
    assert missing.missing_keys == ["backbone.map_w.weight"]
    x, sig = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(s(x, sig, None, w=torch.tensor([1.0, 3.0])), t(x, sig, None))


def test_unet_compiles_for_training_and_sampling():
    torch.manual_seed(0)
    net = EDMPrecond(create("UNet-XS", 8, 1))
    compiled = torch.compile(net)
    y = torch.randn(4, 1, 8, 8)
    sigma, noise = torch.full((4,), 0.7), torch.randn_like(y)
    loss_c = EDMLoss()(compiled, y, sigma=sigma, noise=noise).mean()
    loss_c.backward()
    g_c = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    EDMLoss()(net, y, sigma=sigma, noise=noise).mean().backward()
    for a, b in zip(g_c, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    z = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(heun(compiled.eval(), z, steps=3), heun(net.eval(), z, steps=3), rtol=1e-4, atol=1e-4)
