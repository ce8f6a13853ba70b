"""DDPM++-style UNet backbone for EDM denoisers (Song et al. 2021; Karras et al. 2022, Appendix F).

Parameter names follow one rule so that GDD-I (Zheng & Yang 2024) can freeze "the blocks' 3x3
convolutions and attention projections" by regex: inside every ``enc.*``/``dec.*`` block the 3x3
convolutions are ``conv0``/``conv1`` and the attention projections ``qkv``/``proj``; everything
else (noise/class/w embeddings, ``affine`` modulations, norms, skips, the stem and the head) has
other names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    model_channels: int = 32          # base width; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)   # one entry per resolution level
    num_blocks: int = 2               # residual blocks per level (encoder; decoder has one more)
    attn_resolutions: tuple = (7,)    # resolutions (H) at which blocks get self-attention
    channels_per_head: int = 64       # attention head size; heads = channels // channels_per_head
    dropout: float = 0.0              # dropout inside residual blocks
    noise_channels_mult: int = 1      # noise embedding width = model_channels * this
    emb_channels_mult: int = 4        # embedding MLP width = model_channels * this
    adaptive_scale: bool = True       # embedding gives scale and shift (True) or only a shift (DDPM++)
    w_cond: bool = False              # extra Fourier embedding of the guidance weight w (guided distillation)


def _positional_embedding(x: torch.Tensor, channels: int, max_positions: int = 10000) -> torch.Tensor:
    # Transformer-style sinusoids of a scalar per sample (EDM's c_noise = ln(sigma)/4).
    freqs = torch.arange(channels // 2, dtype=torch.float32, device=x.device) / (channels // 2 - 1)
    freqs = (1 / max_positions) ** freqs
    x = x.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([x.cos(), x.sin()], dim=1)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, max(1, channels // 4)), num_channels=channels, eps=1e-6)


class UNetBlock(nn.Module):
    """Residual block with adaptive scale/shift from the embedding, optional down/up and attention."""

    def __init__(self, in_ch, out_ch, emb_ch, *, down=False, up=False, attention=False,
                 channels_per_head=64, dropout=0.0, adaptive_scale=True):
        super().__init__()
        self.down, self.up, self.dropout, self.adaptive_scale = down, up, dropout, adaptive_scale
        self.norm0 = _group_norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, out_ch * (2 if adaptive_scale else 1))
        self.norm1 = _group_norm(out_ch)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # block starts as identity on the skip path
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or down or up) else None
        self.num_heads = max(1, out_ch // channels_per_head) if attention else 0
        if attention:
            self.norm2 = _group_norm(out_ch)
            self.qkv = nn.Conv2d(out_ch, out_ch * 3, 1)
            self.proj = nn.Conv2d(out_ch, out_ch, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _resample(self, x):
        if self.down:
            return F.avg_pool2d(x, 2, ceil_mode=True) if x.shape[-1] % 2 else F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x, emb):
        orig = x
        x = self._resample(F.silu(self.norm0(x)))
        x = self.conv0(x)
        params = self.affine(emb).unsqueeze(-1).unsqueeze(-1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (x + skip) * (1 / math.sqrt(2))
        if self.num_heads:
            x = x + self._attention(self.norm2(x))
        return x

    def _attention(self, h):
        B, C, H, W = h.shape
        q, k, v = self.qkv(h).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
        out = _attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """DDPM++-style UNet F(x; c_noise, class_labels[, w]) used inside ``EDMPrecond``."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None,
                 num_classes: int = 0, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        self.config, self.img_resolution = cfg, img_resolution
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.num_classes = num_classes
        noise_ch = cfg.model_channels * cfg.noise_channels_mult
        emb_ch = cfg.model_channels * cfg.emb_channels_mult
        self.noise_channels = noise_ch
        self.map_label = nn.Linear(num_classes, noise_ch, bias=False) if num_classes else None
        self.map_w = nn.Linear(noise_ch, noise_ch, bias=False) if cfg.w_cond else None
        if self.map_w is not None:
            nn.init.zeros_(self.map_w.weight)  # a w-conditioned student starts as its teacher
        self.map_layer0 = nn.Linear(noise_ch, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)
        block = dict(emb_ch=emb_ch, channels_per_head=cfg.channels_per_head, dropout=cfg.dropout,
                     adaptive_scale=cfg.adaptive_scale)

        self.enc = nn.ModuleDict()
        res, cout, skips = img_resolution, cfg.model_channels, []
        self.enc[f"{res}x{res}_conv"] = nn.Conv2d(in_channels, cout, 3, padding=1)
        skips.append(cout)
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                res = (res + 1) // 2
                skips.append(cout)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, cfg.model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in cfg.attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        self._dec_res = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
                res = self._dec_res_after_up(res, level)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), cfg.model_channels * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions  # decoder: last block of a level only
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.out_norm = _group_norm(cout)
        self.out_conv = nn.Conv2d(cout, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _dec_res_after_up(self, res, level):
        # Encoder resolutions per level, so odd sizes (28 -> 14 -> 7) come back exactly.
        r = self.img_resolution
        for _ in range(level):
            r = (r + 1) // 2
        return r

    def embed(self, c_noise, class_labels=None, w=None):
        emb = _positional_embedding(c_noise, self.noise_channels)
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        if self.map_w is not None and w is not None:
            emb = emb + self.map_w(_positional_embedding(w, self.noise_channels, max_positions=100))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, c_noise, class_labels=None, w=None):
        emb = self.embed(c_noise, class_labels, w)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
            if name.endswith("_up"):
                x = x[..., : skips[-1].shape[-2], : skips[-1].shape[-1]]  # crop after upsampling odd sizes
        return self.out_conv(F.silu(self.out_norm(x)))


# Named sizes. Widths/levels chosen for the data each is meant for.
UNET_CONFIGS = {
    # ~1M params: trains at ~100 img/s on two CPU cores (28x28 / 32x32 grayscale).
    "UNet-S": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7, 8)),
    # ~3.4M params.
    "UNet-M": UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(7, 8)),
    # tiny, for tests.
    "UNet-XS": UNetConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), channels_per_head=16),
    # EDM's CIFAR-10 DDPM++ configuration (~56M params at 32x32x3).
    "UNet-DDPMpp": UNetConfig(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                              dropout=0.13, emb_channels_mult=4, channels_per_head=256, adaptive_scale=False),
}
