"""GET and ViT one-step generators: sizes, shapes, training/eval semantics, torch.compile."""
import warnings

import pytest
import torch

from getfast.models import get as get_mod
from getfast.models import layers
from getfast.models import vit as vit_mod

warnings.filterwarnings("ignore", message=".*no fused backend available.*")

# Geng et al. 2023 (GET repo STAT.md / paper Tab. 6): parameters at 32×32×3, unconditional
PAPER_COUNTS = {
    "GET-T/2": 8.56e6,
    "GET-M/2": 19.18e6,
    "GET-S/2": 37.17e6,
    "GET-B/2": 62.21e6,
    "GET-B/2+": 83.48e6,
    "ViT-S/2": 21.4e6,
    "ViT-B/2": 85.3e6,
}


def _count(mod, name, **kw):
    with torch.device("meta"):
        model = mod.build(name, img_resolution=32, in_channels=3, num_classes=0, **kw)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    mod = get_mod if name.startswith("GET") else vit_mod
    n = _count(mod, name)
    assert abs(n - PAPER_COUNTS[name]) / PAPER_COUNTS[name] < 0.005, f"{name}: {n:,}"


def test_all_named_configs_build_on_meta():
    for mod in (get_mod, vit_mod):
        for name in mod.CONFIGS:
            assert _count(mod, name) > 0
    # small CPU configs stay small
    assert _count(get_mod, "GET-N/4") < 2e6
    assert _count(vit_mod, "ViT-N/4") < 2e6
    assert {"ViT-S/2", "ViT-B/4", "ViT-L/8", "ViT-XL/2", "ViT-XL/4", "ViT-XL/8"} <= set(vit_mod.CONFIGS)


def test_get_vs_vit_comparison_sizes():
    """docs/RESULTS.md's GET-vs-ViT comparison (28×28×1, 10 classes): ViT-N6/2 has GET-N/2's parameters, ViT-N5x/2 ≈ 5×."""
    def n(mod, name):
        with torch.device("meta"):
            model = mod.build(name, img_resolution=28, in_channels=1, num_classes=10)
        return sum(p.numel() for p in model.parameters())
    get_n = n(get_mod, "GET-N/2")
    assert abs(n(vit_mod, "ViT-N6/2") / get_n - 1) < 0.05
    assert 4.5 < n(vit_mod, "ViT-N5x/2") / get_n < 5.5


def test_unknown_names_and_fields():
    with pytest.raises(ValueError, match="GET-T/2"):
        get_mod.build("GET-Q/2")
    with pytest.raises(ValueError, match="ViT-S/2"):
        vit_mod.build("ViT-Q/2")
    with pytest.raises(TypeError):
        get_mod.build("GET-N/4", not_a_field=1)
    with pytest.raises(TypeError):
        vit_mod.build("ViT-N/4", not_a_field=1)
    with pytest.raises(ValueError, match="grad"):
        get_mod.build("GET-N/4", grad="magic")
    with pytest.raises(ValueError, match="img_resolution"):
        get_mod.build("GET-N/4", img_resolution=30)


def test_registry_create():
    models = pytest.importorskip("getfast.models")
    m = models.create("GET-N/4", img_resolution=28, in_channels=1)
    assert isinstance(m, get_mod.GET) and m.config.patch_size == 4
    assert isinstance(models.create("ViT-N/4", img_resolution=28, in_channels=1), vit_mod.ViT)
    with pytest.raises(ValueError, match="GET-T/2"):
        models.create("nope")


def test_sincos_pos_embed():
    pe = layers.sincos_pos_embed_2d(8, 3, 4)
    assert pe.shape == (12, 8)
    # token 0 sits at (0, 0): sin terms 0, cos terms 1
    torch.testing.assert_close(pe[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    # token 5 = row 1, col 1; lowest frequency is 1: sin(1), cos(1) in both halves
    assert abs(pe[5, 0].item() - torch.sin(torch.tensor(1.0)).item()) < 1e-6
    assert abs(pe[5, 4].item() - torch.sin(torch.tensor(1.0)).item()) < 1e-6
    # column half changes along a row, row half does not
    assert not torch.equal(pe[0, :4], pe[1, :4]) and torch.equal(pe[0, 4:], pe[1, 4:])
    m = get_mod.build("GET-N/4", 32, 3)
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], layers.sincos_pos_embed_2d(128, 8, 8))


def test_patchify_roundtrip():
    pe = layers.PatchEmbed(2, 3, 12)
    with torch.no_grad():  # identity patch embedding: channel layout (p, q, c)
        w = torch.zeros(12, 3, 2, 2)
        for p in range(2):
            for q in range(2):
                for c in range(3):
                    w[(p * 2 + q) * 3 + c, c, p, q] = 1
        pe.proj.weight.copy_(w)
        pe.proj.bias.zero_()
    x = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(layers.unpatchify(pe(x), 2, 3, 3, 4), x)


def _small_get(**kw):
    torch.manual_seed(0)
    return get_mod.build("GET-N/4", img_resolution=28, in_channels=1, **kw)


def _randomise_decoder(m):
    with torch.no_grad():
        m.final_layer.linear.weight.normal_(std=0.05)


def test_get_zero_init_decoder_and_shapes():
    m = _small_get()
    x = torch.randn(2, 1, 28, 28)
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 1, 28, 28) and torch.count_nonzero(y) == 0
    m.train()
    states = m(x)
    assert isinstance(states, list) and len(states) == 6
    assert all(s.shape == (2, 1, 28, 28) for s in states)


def test_get_train_backward_reaches_every_trainable_parameter():
    m = _small_get(grad_steps=3)
    _randomise_decoder(m)
    m.train()
    x = torch.randn(2, 1, 28, 28)
    states = m(x)
    assert len(states) == 3
    loss = sum(0.8 ** (len(states) - 1 - k) * (s - 1).abs().mean() for k, s in enumerate(states))
    loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert name == "pos_embed" and p.grad is None


def test_get_supervised_states_are_the_unrolled_iterates():
    m = _small_get(grad_steps=4, sup_gap=2)
    _randomise_decoder(m)
    m.train()
    x = torch.randn(2, 1, 28, 28)
    z0 = torch.randn(2, 49, 128)
    states = m(x, z0=z0)
    assert len(states) == 2
    with torch.no_grad():
        _, offs = m.inject(x)
        z = z0
        expected = []
        for k in range(4):
            z = m.equilibrium_step(z, *offs)
            if k % 2 == 1:
                expected.append(m.decode(z))
    for s, e in zip(states, expected):
        torch.testing.assert_close(s.detach(), e)


@pytest.mark.parametrize("z_init", ["noise", "zeros", "input"])
def test_get_fixed_point_start(z_init):
    """The unrolled iterates start from noise (GET), zeros, or the injection tokens x; the last two are
    deterministic in (noise, label), and z0 still overrides every choice."""
    m = _small_get(grad_steps=2, z_init=z_init)
    _randomise_decoder(m)
    m.train()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens, offs = m.inject(x)
        start = {"zeros": torch.zeros_like(tokens), "input": tokens}.get(z_init)
        a, b = m(x)[-1], m(x)[-1]
        if start is not None:
            torch.testing.assert_close(a, m.decode(m.equilibrium_step(m.equilibrium_step(start, *offs), *offs)))
            torch.testing.assert_close(a, b)
        else:
            assert not torch.allclose(a, b)  # a fresh Gaussian start per call
        z0 = torch.randn_like(tokens)
        torch.testing.assert_close(m(x, z0=z0)[-1], m.decode(m.equilibrium_step(m.equilibrium_step(z0, *offs), *offs)))
    with pytest.raises(ValueError, match="z_init"):
        _small_get(z_init="ones")


@pytest.mark.parametrize("contractive", [False, True])
def test_get_eval_returns_lowest_residual_iterate(contractive):
    m = _small_get(eval_iters=5)
    _randomise_decoder(m)
    if contractive:  # shrink the equilibrium blocks: residuals then decrease, the last is best
        with torch.no_grad():
            for blk in m.deq_blocks:
                for p in blk.parameters():
                    p.mul_(0.05)
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    z0 = torch.randn(3, 49, 128)
    with torch.no_grad():
        y, info = m(x, z0=z0, return_info=True)
        _, offs = m.inject(x)
        z, res, imgs = z0, [], []
        for _ in range(5):
            fz = m.equilibrium_step(z, *offs)
            res.append((fz - z).flatten(1).norm(dim=1))
            imgs.append(fz)
            z = fz
        res = torch.stack(res, 1)
        best = res.argmin(1)
        expected = m.decode(torch.stack([imgs[b][i] for i, b in enumerate(best.tolist())]))
    assert (best == 4).all() if contractive else (best < 4).all()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info["stats"]["abs_trace"], res, rtol=1e-4, atol=1e-4)


def test_get_anderson_solver_option():
    m = _small_get(solver="anderson", solver_kwargs={"m": 3}, eval_iters=4)
    m.eval()
    with torch.no_grad():
        y, info = m(torch.randn(2, 1, 28, 28), return_info=True)
    assert y.shape == (2, 1, 28, 28) and info["stats"]["abs_trace"].shape == (2, 4)


def test_get_grad_checkpoint_matches():
    x = torch.randn(2, 1, 28, 28)
    z0 = torch.randn(2, 49, 128)
    grads = []
    for ckpt in (False, True):
        m = _small_get(grad_steps=2, grad_checkpoint=ckpt)
        _randomise_decoder(m)
        m.train()
        loss = sum(s.square().mean() for s in m(x, z0=z0))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_get_grad_modes_are_distinct_and_validated():
    with pytest.raises(ValueError, match="train_solver_iters"):
        get_mod.build("GET-N/4", grad="phantom")  # a phantom gradient starts from a solver's output
    with pytest.raises(ValueError, match="train_solver_iters"):
        get_mod.build("GET-N/4", grad="unrolled", train_solver_iters=3)
    with pytest.raises(ValueError, match="solver"):
        get_mod.build("GET-N/4", solver="bogus")
    with pytest.raises(ValueError, match="tau"):
        get_mod.build("GET-N/4", tau=0.0)


def _tiny_get64(**kw):
    torch.manual_seed(0)
    m = get_mod.build("GET-N/4", img_resolution=4, in_channels=1, width=16, heads=2, inj_depth=1, deq_mlp_ratio=2,
                      **kw).double()
    with torch.no_grad():
        for blk in m.deq_blocks:  # a contractive equilibrium map, so the solver has a fixed point to find
            for p in blk.parameters():
                p.mul_(0.3)
        m.final_layer.linear.weight.normal_(std=0.3)
    return m.train()


def _fd_check(m, loss_fn, names, h=1e-6):
    """Autograd gradient of ``loss_fn()`` against central finite differences on a few entries of each parameter."""
    m.zero_grad()
    loss_fn().backward()
    params = dict(m.named_parameters())
    for name in names:
        p = params[name]
        flat = p.detach().view(-1)
        for i in (0, flat.numel() // 2, flat.numel() - 1):
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + h
                up = float(loss_fn())
                flat[i] = old - h
                down = float(loss_fn())
                flat[i] = old
            fd = (up - down) / (2 * h)
            assert abs(float(p.grad.view(-1)[i]) - fd) <= 1e-6 + 1e-5 * abs(fd), (name, i, float(p.grad.view(-1)[i]), fd)


_GRAD_PARAMS = ["qkv_inj.weight", "deq_blocks.0.attn.qkv.weight", "deq_blocks.2.mlp.fc2.weight",
                "final_layer.linear.weight", "patch_embed.proj.weight"]


def test_unrolled_gradient_matches_finite_differences():
    """grad='unrolled': the gradient is exactly that of the loss through the 6 steps from the noise start."""
    m = _tiny_get64(grad="unrolled", grad_steps=6)
    x, z0 = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 16, dtype=torch.float64)
    target = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def loss():
        return sum(0.8 ** (5 - k) * (s - target).square().mean() for k, s in enumerate(m(x, z0=z0)))
    _fd_check(m, loss, _GRAD_PARAMS)


def test_phantom_gradient_matches_finite_differences():
    """grad='phantom' (Geng et al. 2021): the solver runs without gradient, then k damped steps
    z ← τ·f(z) + (1 − τ)·z start from its output; the gradient is that of the loss through those k steps with the
    solver's output held fixed, which finite differences see when z* is computed once at the unperturbed weights."""
    m = _tiny_get64(grad="phantom", train_solver_iters=8, grad_steps=2, tau=0.6)
    x, z0 = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 16, dtype=torch.float64)
    target = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    from getfast.deq import solve
    with torch.no_grad():
        _, offs = m.inject(x)
        z_star, _ = solve(lambda z: m.equilibrium_step(z, *offs), z0, solver="fixed_point", max_iter=8)

    def phantom_loss():  # the function the phantom gradient differentiates, written out
        _, offs = m.inject(x)
        z, total = z_star, 0.0
        for k in range(2):
            z = 0.6 * m.equilibrium_step(z, *offs) + 0.4 * z
            total = total + 0.8 ** (1 - k) * (m.decode(z) - target).square().mean()
        return total

    m.zero_grad()
    states = m(x, z0=z0)
    sum(0.8 ** (1 - k) * (s - target).square().mean() for k, s in enumerate(states)).backward()
    model_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    _fd_check(m, phantom_loss, _GRAD_PARAMS)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(model_grads[n], p.grad, rtol=1e-9, atol=1e-12)


def test_get_phantom_with_solver_iterations():
    m = _small_get(grad="phantom", train_solver_iters=3, grad_steps=2, tau=0.6)
    _randomise_decoder(m)
    m.train()
    states, info = m(torch.randn(2, 1, 28, 28), return_info=True)
    assert len(states) == 2 and info["stats"]["abs_trace"].shape == (2, 3)
    states[-1].mean().backward()
    assert m.qkv_inj.weight.grad is not None


def test_get_ift_gradient():
    m = _small_get(grad="ift", eval_iters=4)
    _randomise_decoder(m)
    m.train()
    states = m(torch.randn(2, 1, 28, 28))
    assert len(states) == 1
    states[0].square().mean().backward()
    assert m.qkv_inj.weight.grad is not None and torch.count_nonzero(m.qkv_inj.weight.grad) > 0


def test_class_conditioning_and_null_class():
    torch.manual_seed(0)
    m = get_mod.build("GET-N/4", 28, 1, num_classes=10, null_class=True, eval_iters=2)
    _randomise_decoder(m)
    m.eval()
    x = torch.randn(4, 1, 28, 28)
    z0 = torch.randn(4, 49, 128)
    labels = torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        a = m(x, labels, z0=z0)
        b = m(x, torch.nn.functional.one_hot(labels, 10).float(), z0=z0)
        u = m(x, None, z0=z0)  # null class
        u2 = m(x, torch.full((4,), 10), z0=z0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, u2)
    assert not torch.allclose(a, u)
    with pytest.raises(ValueError, match="class_labels"):
        get_mod.build("GET-N/4", 28, 1, num_classes=10)(x)  # no null class: labels required
    with pytest.raises(ValueError, match="class_labels"):
        _small_get()(x, labels)  # unconditional model
    with pytest.raises(TypeError):  # label dropout belongs to a training method, not to the network
        get_mod.build("GET-N/4", 28, 1, num_classes=10, label_dropout=0.1)
    # the embedding is the same in training mode: a student is a deterministic function of (noise, label)
    emb = m.class_embed
    emb.train()
    torch.testing.assert_close(emb(labels, 4), emb.table(labels).unsqueeze(1))
    assert emb.null_label == 10


def test_vit_forward_backward():
    torch.manual_seed(0)
    v = vit_mod.build("ViT-N/4", img_resolution=32, in_channels=3, num_classes=5, depth=2)
    x = torch.randn(2, 3, 32, 32)
    y = v(x, torch.tensor([1, 4]))
    assert y.shape == x.shape and torch.count_nonzero(y) == 0  # zero-initialised decoder
    _randomise_decoder(v)
    v(x, torch.tensor([1, 4])).square().mean().backward()
    assert all(p.grad is not None for p in v.parameters() if p.requires_grad)


def test_vit_grad_checkpoint_matches():
    x = torch.randn(2, 3, 32, 32)
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        v = vit_mod.build("ViT-N/4", depth=2, grad_checkpoint=ckpt)
        _randomise_decoder(v)
        v(x).square().mean().backward()
        out.append(v.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- torch.compile (CPU)

@pytest.mark.parametrize("backend", [None, "triton"])
def test_compile_block_fullgraph(monkeypatch, backend):
    """A GET equilibrium block (with qkv offset) compiles with fullgraph through the attention op."""
    if backend is None:
        monkeypatch.delenv("GETFAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("GETFAST_BACKEND", backend)
    torch.manual_seed(0)
    blk = layers.Block(64, 2, mlp_ratio=2)
    x = torch.randn(2, 17, 64, requires_grad=True)
    u = torch.randn(2, 17, 192)
    torch._dynamo.reset()
    cblk = torch.compile(blk, fullgraph=True)
    y = cblk(x, u)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = blk(x, u)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_whole_models_fullgraph(monkeypatch):
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)
    torch._dynamo.reset()
    x = torch.randn(2, 1, 28, 28)
    m = _small_get(inj_depth=1, deq_mlp_ratio=2, grad_steps=2, eval_iters=2)
    _randomise_decoder(m)
    cm = torch.compile(m, fullgraph=True)
    m.train()
    z0 = torch.randn(2, 49, 128)
    states = cm(x, z0=z0)
    sum(s.square().mean() for s in states).backward()
    torch.testing.assert_close(states[-1], m(x, z0=z0)[-1], rtol=1e-4, atol=1e-5)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(x, z0=z0), m(x, z0=z0), rtol=1e-4, atol=1e-5)
    v = vit_mod.build("ViT-N/4", 28, 1, depth=1)
    cv = torch.compile(v, fullgraph=True)
    cv(x).square().mean().backward()
