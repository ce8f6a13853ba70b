"""Generative Equilibrium Transformer (GET): a one-step generator that is a deep equilibrium model.

Geng, Pokle, Luo, Lin & Kolter, *One-Step Diffusion Distillation via Deep Equilibrium Models*
(NeurIPS 2023, arXiv 2401.08639), Sec. 3 and Fig. 2:

* **Injection transformer** — patch embedding + frozen 2-D sin-cos position embedding, then
  ``inj_depth`` pre-LN ViT blocks (MLP×4); one bias-free linear maps its output ``x`` to an
  additive ``qkv`` offset ``u_i`` for each of the ``deq_depth`` (3) equilibrium blocks.
* **Equilibrium transformer** — ``f(z) = B_3(B_2(B_1(z; u_1); u_2); u_3)`` where ``B_i`` is a
  pre-LN block whose attention computes ``qkv = W z + b + u_i (+ class embedding)`` (Eq. 6) and
  whose MLP has ratio ``deq_mlp_ratio``. The fixed point ``z* = f(z*)`` is found with
  :mod:`getfast.deq`, starting from Gaussian noise shaped like the tokens (GET's choice; ``z_init`` also offers
  zeros, and ``"input"``, the injection transformer's tokens ``x``: not in the paper, it shortened the early
  plateau of GET-N/2's training here, see docs/RESULTS.md).
* **Decoder** — zero-initialised ``LayerNorm → Linear`` to patch pixels, then unpatchify.

Training (``grad``):

* ``"unrolled"`` (GET's recipe, Sec. 3.2 and the official ``--f_max_iter 0 --grad 6``): ``grad_steps``
  differentiable fixed-point steps from the noise start; every ``sup_gap``-th state is decoded and
  returned for the fixed-point-correction loss (weights ``0.8^(n-1-k)``, :mod:`getfast.deq`).
* ``"phantom"`` (phantom gradient, Geng et al. 2021, "On Training Implicit Models", Sec. 3): the solver
  runs ``train_solver_iters`` iterations without gradient, then ``grad_steps`` damped differentiable steps
  ``z <- tau*f(z) + (1-tau)*z`` start from its (detached) output.
* ``"ift"``: the solver's fixed point, differentiated implicitly (Bai et al. 2019, Sec. 3.1.2); one state.

Evaluation: ``eval_iters`` solver iterations from the noise start; the lowest-residual iterate is decoded.

State (``state``, not in the paper): the blocks are pre-LN residual blocks, ``B(z) = z + g(LN(z))``, so
``f(z) = z`` needs the three residual updates to cancel, which training never asks for; a trained GET's
iterates grow in norm at every step while their direction (all the LayerNorm of the decoder reads) settles:
the paper's "fixed point" exists only up to scale, and a solver has no point to converge to.
``state="normalized"`` iterates on the per-token normalised state instead, ``f̃(u) = N(f(u))`` with
``N`` a parameter-free LayerNorm (the decoder's own normalisation, so ``decode(N(z)) = decode(z)``):
``f̃`` maps the set of normalised states into itself, and its fixed points are exactly the directions
the raw iteration settles to, so Anderson/Broyden have a point to converge to. ``"raw"`` (default) is GET.

``CONFIGS`` maps names to :class:`GETConfig`; :func:`build` makes a model.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from getfast.deq import ift, list_solvers, phantom_grad, solve
from getfast.models.layers import (
    Block,
    FinalLayer,
    init_transformer_,
    setup_patch_io,
    unpatchify,
)

__all__ = ["GETConfig", "GET", "CONFIGS", "Z_INITS", "build"]

_GRADS = ("unrolled", "phantom", "ift")
Z_INITS = ("noise", "zeros", "input")
STATES = ("raw", "normalized")
_STATE_EPS = 1e-6  # the decoder LayerNorm's eps, so N(N(z)) = N(z) to round-off


@dataclasses.dataclass(frozen=True)
class GETConfig:
    """GET hyper-parameters; names follow the paper's ``(width, heads, injection depth, DEQ MLP ratio)``.

    Unknown fields passed to :func:`build` raise ``TypeError``.
    """

    width: int
    heads: int
    inj_depth: int
    deq_mlp_ratio: float
    patch_size: int = 2
    deq_depth: int = 3
    mlp_ratio: float = 4.0  # injection blocks
    qkv_bias: bool = True
    null_class: bool = False  # extra "no class" embedding for classifier-free guidance
    # fixed-point solve
    z_init: str = "noise"  # "noise" (Gaussian, GET) | "zeros" | "input" (the injection tokens x)
    state: str = "raw"  # "raw" (GET: iterate z) | "normalized" (iterate N(z), a map with a fixed point)
    solver: str = "fixed_point"  # any getfast.deq solver name
    solver_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. {"m": 5} for anderson
    eval_iters: int = 6  # solver iterations at evaluation
    tol: float | None = None  # None: exactly eval_iters iterations, no host syncs
    # gradient
    grad: str = "unrolled"  # "unrolled" (from the noise start) | "phantom" (after a no-grad solve) | "ift"
    train_solver_iters: int = 0  # phantom: solver iterations without gradient (>= 1); ift: forward solve (0: eval_iters)
    grad_steps: int = 6  # differentiable steps (GET: 6 from the noise start)
    sup_gap: int = 1  # supervise every sup_gap-th differentiable state (the last is always kept)
    tau: float = 1.0  # damping of the differentiable steps: z <- tau*f(z) + (1-tau)*z
    ift_solver: str | None = None  # backward solver for grad="ift" (default: `solver`)
    # The backward solve w = Jᵀw + v converges like ρ(J)^k: at ρ ≈ 0.94 (measured on a trained GET-N/2) 12
    # iterations leave a 17 % gradient error, so it runs to a relative tolerance with a generous cap, and
    # the method reports (and warns once) when the cap was hit first.
    ift_max_iter: int = 100
    ift_tol: float | None = 1e-3
    grad_checkpoint: bool = False  # recompute each block / each fixed-point step in backward

    def __post_init__(self):
        if self.grad not in _GRADS:
            raise ValueError(f"grad: {self.grad!r} not one of {_GRADS}")
        if self.z_init not in Z_INITS:
            raise ValueError(f"z_init: {self.z_init!r} not one of {Z_INITS}")
        if self.state not in STATES:
            raise ValueError(f"state: {self.state!r} not one of {STATES}")
        if self.ift_max_iter < 1:
            raise ValueError(f"ift_max_iter: must be >= 1, got {self.ift_max_iter}")
        if self.ift_tol is not None and not self.ift_tol > 0:
            raise ValueError(f"ift_tol: must be > 0 (or None for exactly ift_max_iter iterations), got {self.ift_tol}")
        if self.grad_steps < 1:
            raise ValueError(f"grad_steps: must be >= 1, got {self.grad_steps}")
        if self.sup_gap < 1:
            raise ValueError(f"sup_gap: must be >= 1, got {self.sup_gap}")
        if self.eval_iters < 1:
            raise ValueError(f"eval_iters: must be >= 1, got {self.eval_iters}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau: must be in (0, 1], got {self.tau}")
        if self.train_solver_iters < 0:
            raise ValueError(f"train_solver_iters: must be >= 0, got {self.train_solver_iters}")
        if self.grad == "phantom" and self.train_solver_iters < 1:
            raise ValueError("train_solver_iters: grad='phantom' runs the solver without gradient before its "
                             "differentiable steps, so it needs train_solver_iters >= 1")
        if self.grad == "unrolled" and self.train_solver_iters:
            raise ValueError("train_solver_iters: grad='unrolled' differentiates every step from the noise start; "
                             "use grad='phantom' to run solver iterations without gradient first")
        known = list_solvers()
        for name, solver in (("solver", self.solver), ("ift_solver", self.ift_solver)):
            if solver is not None and solver not in known:
                raise ValueError(f"{name}: {solver!r} is not a registered solver; known: {known}")


CONFIGS: dict[str, GETConfig] = {
    # paper sizes (arXiv 2401.08639, Tab. 6; params at 32×32×3, unconditional)
    "GET-T/2": GETConfig(width=256, heads=4, inj_depth=6, deq_mlp_ratio=6),  # 8.56M
    "GET-M/2": GETConfig(width=384, heads=6, inj_depth=6, deq_mlp_ratio=6),  # 19.18M
    "GET-S/2": GETConfig(width=512, heads=8, inj_depth=6, deq_mlp_ratio=8),  # 37.17M
    "GET-B/2": GETConfig(width=768, heads=12, inj_depth=1, deq_mlp_ratio=12),  # 62.21M
    "GET-B/2+": GETConfig(width=768, heads=12, inj_depth=6, deq_mlp_ratio=8),  # 83.48M
    # small configs for two CPU cores (28×28 or 32×32 inputs)
    "GET-N/4": GETConfig(width=128, heads=4, inj_depth=2, deq_mlp_ratio=4, patch_size=4),
    "GET-N/2": GETConfig(width=128, heads=4, inj_depth=2, deq_mlp_ratio=4, patch_size=2),
    # the capacity regime at 16×16×1 (docs/RESULTS.md, issue 26): 0.29M parameters, 64 tokens at patch 2
    "GET-P/2": GETConfig(width=64, heads=4, inj_depth=2, deq_mlp_ratio=4, patch_size=2),
}


class GET(nn.Module):
    """Generative Equilibrium Transformer.

    ``forward(x_noise, class_labels=None, *, z0=None, return_info=False)``:
    training mode → list of decoded supervised states ``[(B, C, H, W), ...]`` (earliest first);
    eval mode → the lowest-residual iterate decoded, ``(B, C, H, W)``.
    """

    def __init__(self, img_resolution: int, in_channels: int, num_classes: int = 0, config: GETConfig = CONFIGS["GET-T/2"]):
        super().__init__()
        cfg = config
        D = setup_patch_io(self, img_resolution, in_channels, num_classes, cfg)
        self.inj_blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.inj_depth)
        )
        self.qkv_inj = nn.Linear(D, 3 * D * cfg.deq_depth, bias=False)
        self.deq_blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.deq_mlp_ratio, cfg.qkv_bias) for _ in range(cfg.deq_depth)
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.ift_record: dict = {}  # the last IFT backward solve's convergence (grad="ift" only)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer_(self)

    # ------------------------------------------------------------------ pieces
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` → image ``(B, C, H, W)``."""
        return unpatchify(self.final_layer(z), self.patch_size, self.out_channels, *self.grid)

    def inject(self, x_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        """Injection transformer: returns ``(tokens x, qkv offsets per equilibrium block)``.

        Each offset is ``u_i`` (+ the class embedding), broadcastable to ``(B, N, 3D)``.
        """
        B = x_noise.shape[0]
        x = self.patch_embed(x_noise) + self.pos_embed
        c = None
        if self.class_embed is not None:
            c = self.class_embed(class_labels, B)  # (B, 1, 3D)
        elif class_labels is not None and class_labels.numel() > 0:
            raise ValueError("class_labels: given to an unconditional model (num_classes=0)")
        for blk in self.inj_blocks:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, c, use_reentrant=False)
            else:
                x = blk(x, c)
        offsets = self.qkv_inj(x).chunk(self.config.deq_depth, dim=-1)
        if c is not None:
            offsets = tuple(u + c for u in offsets)
        return x, tuple(offsets)

    def equilibrium_step(self, z: torch.Tensor, *offsets: torch.Tensor) -> torch.Tensor:
        """One application of the equilibrium transformer ``f(z; u)``."""
        for blk, u in zip(self.deq_blocks, offsets):
            z = blk(z, u)
        return z

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """``N(z)``: per-token LayerNorm without parameters (the state map of ``state="normalized"``)."""
        return nn.functional.layer_norm(z, z.shape[-1:], eps=_STATE_EPS)

    def _initial_state(self, x: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        if z0 is not None:
            if z0.shape != x.shape:
                raise ValueError(f"z0: expected shape {tuple(x.shape)}, got {tuple(z0.shape)}")
            z = z0.to(x.dtype)
        elif self.config.z_init == "zeros":
            return torch.zeros_like(x)  # N(0) = 0: the normalized map starts from its first image
        elif self.config.z_init == "input":
            z = x
        else:
            z = torch.randn_like(x)
        return self.normalize(z) if self.config.state == "normalized" else z

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        z0: torch.Tensor | None = None,
        return_info: bool = False,
    ):
        """Map noise ``(B, C, H, W)`` (and optional labels: ``(B,)`` ints or ``(B, K)`` one-hot)
        to images. ``z0`` overrides the random fixed-point start (shape ``(B, N, D)``);
        ``return_info`` also returns a dict with the solver ``stats``."""
        if x_noise.dim() != 4 or x_noise.shape[1] != self.in_channels or tuple(x_noise.shape[2:]) != self.img_resolution:
            raise ValueError(
                f"x_noise: expected (B, {self.in_channels}, {self.img_resolution[0]}, {self.img_resolution[1]}), "
                f"got {tuple(x_noise.shape)}"
            )
        cfg = self.config
        x, offsets = self.inject(x_noise, class_labels)
        z = self._initial_state(x, z0)

        if cfg.state == "normalized":
            def f(state: torch.Tensor) -> torch.Tensor:
                return self.normalize(self.equilibrium_step(state, *offsets))
        else:
            def f(state: torch.Tensor) -> torch.Tensor:
                return self.equilibrium_step(state, *offsets)

        info: dict = {}
        if not self.training:
            with torch.no_grad():
                z, stats = solve(f, z, solver=cfg.solver, max_iter=cfg.eval_iters, tol=cfg.tol, **cfg.solver_kwargs)
            info["stats"] = stats
            out = self.decode(z)
            return (out, info) if return_info else out

        if cfg.grad == "ift":
            states = [self._ift(f, z, offsets, info)]
        else:
            states = self._unrolled(f, z, offsets, info)
        out = [self.decode(s) for s in states]
        return (out, info) if return_info else out

    def _unrolled(self, f, z, offsets, info) -> list[torch.Tensor]:
        """Unrolled: ``grad_steps`` damped differentiable steps from the noise start. Phantom: first
        ``train_solver_iters`` solver iterations without gradient, then the same steps from their output
        (Geng et al. 2021, Sec. 3)."""
        cfg = self.config
        if cfg.train_solver_iters > 0:
            with torch.no_grad():
                z, stats = solve(
                    f, z, solver=cfg.solver, max_iter=cfg.train_solver_iters, tol=cfg.tol, **cfg.solver_kwargs
                )
            info["stats"] = stats
            z = z.detach()
        if cfg.grad_checkpoint and torch.is_grad_enabled():
            step = functools.partial(self._checkpointed_step, offsets=offsets)
        else:
            step = f
        k = cfg.grad_steps
        supervise = sorted({i for i in range(1, k + 1) if i % cfg.sup_gap == 0} | {k})
        return phantom_grad(step, z, k=k, tau=cfg.tau, supervise=supervise)

    def _checkpointed_step(self, z: torch.Tensor, offsets) -> torch.Tensor:
        z = checkpoint(self.equilibrium_step, z, *offsets, use_reentrant=False)
        return self.normalize(z) if self.config.state == "normalized" else z

    def _ift(self, f, z, offsets, info) -> torch.Tensor:
        """Fixed point by the solver; gradient by implicit differentiation (Bai et al. 2019, Sec. 3.1.2)."""
        cfg = self.config
        with torch.no_grad():
            z, stats = solve(f, z, solver=cfg.solver, max_iter=cfg.train_solver_iters or cfg.eval_iters,
                             tol=cfg.tol, **cfg.solver_kwargs)
        info["stats"] = stats
        back = cfg.ift_solver or cfg.solver
        extra = cfg.solver_kwargs if back == cfg.solver else {}
        info["ift"] = self.ift_record  # filled by the backward solve: the method reports it
        return ift(f, z, solver=back, max_iter=cfg.ift_max_iter, tol=cfg.ift_tol, stats_hook=self._ift_hook, **extra)

    def _ift_hook(self, stats: dict) -> None:
        # Called in backward. Keeps device tensors only (no host sync here); the training method reads them
        # after the step and turns them into a log value and a one-time warning.
        self.ift_record["converged"] = stats["converged"]
        self.ift_record["rel_lowest"] = stats["rel_lowest"]


def build(name: str, img_resolution: int = 32, in_channels: int = 3, num_classes: int = 0, **kw) -> GET:
    """Build the named GET; ``kw`` overrides :class:`GETConfig` fields (unknown → ``TypeError``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown GET model {name!r}; known: {', '.join(CONFIGS)}")
    cfg = dataclasses.replace(CONFIGS[name], **kw)
    return GET(img_resolution, in_channels, num_classes=num_classes, config=cfg)
