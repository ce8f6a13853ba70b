"""Shared transformer pieces for the GET and ViT one-step generators.

Pre-LN ViT blocks (Dosovitskiy et al. 2021) in the DiT/MAE style used by the Generative
Equilibrium Transformer (Geng et al. 2023, arXiv 2401.08639, Sec. 3): patch embedding, a frozen
2-D sin-cos position embedding, multi-head self-attention whose fused ``qkv`` projection accepts
an additive offset (GET's injection and class conditioning), a GELU MLP, and a zero-initialised
decoder that maps tokens back to patches.

Attention goes through :func:`getfast.ops.attention`, so the fused flash-attention kernel is used
on GPUs and ``torch.compile(fullgraph=True)`` traces a block on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from getfast.ops import attention as _attention

__all__ = [
    "sincos_pos_embed_2d",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
    "FinalLayer",
    "ClassEmbedding",
    "unpatchify",
    "init_transformer_",
]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape ``(grid_h*grid_w, dim)`` (float32).

    Half of the channels encode the row index and half the column index; each half is the 1-D
    transformer embedding ``[sin(p·ω_k), cos(p·ω_k)]`` with ``ω_k = 10000^(-k/(dim/4))``
    (Vaswani et al. 2017, Sec. 3.5, applied per axis as in MAE/DiT). Tokens are in row-major
    order (the order produced by :class:`PatchEmbed`).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4 != 0:
        raise ValueError(f"dim: the 2-D sin-cos embedding needs a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # token -> row
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # token -> column

    def axis(pos: torch.Tensor) -> torch.Tensor:
        ang = pos[:, None] * omega[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    # first half: column (x) coordinate, second half: row (y) coordinate
    return torch.cat([axis(cols), axis(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``p×p`` patches → tokens ``(B, N, D)`` via a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ClassEmbedding(nn.Module):
    """Class labels → an additive ``qkv`` offset ``(B, 1, 3D)``.

    Labels may be integer indices ``(B,)`` or (soft) one-hot rows ``(B, num_classes)`` as in EDM.
    With ``null_class`` an extra row (index ``num_classes``, :attr:`null_label`) is the unconditional
    embedding used for classifier-free guidance (Ho & Salimans 2022). The embedding is a deterministic
    function of the labels: a method that trains an unconditional branch replaces labels by
    :attr:`null_label` itself (label dropout belongs to the training method, never to the network).
    """

    def __init__(self, num_classes: int, out_dim: int, null_class: bool = False):
        super().__init__()
        self.num_classes = int(num_classes)
        self.null_class = bool(null_class)
        self.table = nn.Embedding(num_classes + int(null_class), out_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        w = self.table.weight
        if labels is None:
            if not self.null_class:
                raise ValueError("class_labels: required by a class-conditional model without a null class")
            emb = w[self.num_classes].expand(batch, -1)
        elif labels.dtype.is_floating_point:
            if labels.shape != (batch, self.num_classes):
                raise ValueError(f"class_labels: one-hot labels must be ({batch}, {self.num_classes}), got {tuple(labels.shape)}")
            emb = labels.to(w.dtype) @ w[: self.num_classes]
        else:
            if labels.shape != (batch,):
                raise ValueError(f"class_labels: integer labels must have shape ({batch},), got {tuple(labels.shape)}")
            emb = self.table(labels)
        return emb.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an optional additive offset.

    ``forward(x, qkv_offset=None)``: ``qkv = W x + b (+ qkv_offset)`` — the offset broadcasts
    against ``(B, N, 3D)`` (GET adds its injection ``u`` and the class embedding here,
    Geng et al. 2023, Eq. 6) — then ``softmax(q kᵀ/√d) v`` by :func:`getfast.ops.attention`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads: {num_heads} does not divide the width {dim}")
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, qkv_offset: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x)
        if qkv_offset is not None:
            qkv = qkv + qkv_offset
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = _attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Two-layer GELU MLP ``fc2(gelu(fc1 x))`` with hidden width ``int(dim·ratio)``."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x += attn(LN(x), qkv_offset); x += mlp(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, qkv_offset: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), qkv_offset)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Decoder: ``LN → Linear(D, p²·C)`` per token; zero-initialised by :func:`init_transformer_`."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Tokens ``(B, h·w, p·p·C)`` → image ``(B, C, h·p, w·p)`` (inverse of :class:`PatchEmbed`'s layout)."""
    B = x.shape[0]
    p = patch_size
    x = x.reshape(B, grid_h, grid_w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid_h * p, grid_w * p)


def setup_patch_io(model: nn.Module, img_resolution, in_channels: int, num_classes: int, cfg) -> int:
    """The image/token interface GET and ViT share, set on ``model`` (after ``nn.Module.__init__``): resolution
    and grid checks, the patch embedding, the frozen sin-cos position table and the class embedding (3·width:
    adaLN shift/scale/gate). ``cfg`` needs ``patch_size`` and ``width``, and ``null_class`` for the class
    embedding. Returns the width."""
    res = (img_resolution, img_resolution) if isinstance(img_resolution, int) else tuple(img_resolution)
    if res[0] % cfg.patch_size or res[1] % cfg.patch_size:
        raise ValueError(f"img_resolution: {res} is not divisible by the patch size {cfg.patch_size}")
    model.config = cfg
    model.img_resolution = res
    model.in_channels = model.out_channels = in_channels
    model.num_classes = num_classes
    model.patch_size = cfg.patch_size
    model.grid = (res[0] // cfg.patch_size, res[1] // cfg.patch_size)
    D = cfg.width
    model.patch_embed = PatchEmbed(cfg.patch_size, in_channels, D)
    # frozen sin-cos table, kept as a (non-trainable) parameter as in the MAE/DiT/GET reference checkpoints
    model.pos_embed = nn.Parameter(torch.zeros(1, model.grid[0] * model.grid[1], D), requires_grad=False)
    model.class_embed = ClassEmbedding(num_classes, 3 * D, cfg.null_class) if num_classes > 0 else None
    return D


def init_transformer_(model: nn.Module) -> None:
    """Initialisation used by ViT/DiT/GET: Xavier-uniform linear weights (the patch conv as a
    flattened linear), zero biases, unit LayerNorms, N(0, 0.02²) class embeddings, and a zero
    decoder so every model starts by predicting zeros; a model set up by :func:`setup_patch_io` gets its
    frozen sin-cos position table."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
            nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, ClassEmbedding):
            nn.init.normal_(m.table.weight, std=0.02)
    for m in model.modules():
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)
    if isinstance(getattr(model, "pos_embed", None), torch.Tensor):
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed_2d(model.pos_embed.shape[-1], *model.grid).unsqueeze(0))
