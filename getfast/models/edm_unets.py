"""The network architectures of EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Appendix F.2 and Table 7), so that NVlabs' released checkpoints run as getfast modules.

* ``SongUNet`` — DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
  Appendix H): positional or random-Fourier noise embedding, standard/skip/residual encoders, standard/skip
  decoders, resampling with the [1,1] (box) or [1,3,3,1] (binomial) FIR filter.
* ``DhariwalUNet`` — ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3): adaptive group
  normalisation (scale and shift from the embedding), multi-head attention at several resolutions.

Constructor arguments and parameter/buffer names are EDM's, because a checkpoint is described by exactly
those: ``getfast.importers`` reads them from a pickle and builds these modules, then loads the state dict
strictly. The numerics follow EDM's operation order (bias added after the convolution, skip connections
added before scaling, the same embedding arithmetic), so outputs agree to float32 round-off.

Two deliberate differences from training with NVlabs' code: label dropout is never applied inside the
network (getfast's training methods drop labels themselves, and a student copied from a teacher must be a
deterministic function of its inputs), and attention runs through ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _fir_2d(taps) -> torch.Tensor:
    """Separable 2-D FIR kernel ``f fᵀ / (Σf)²`` shaped (1, 1, k, k): [1,1] is a box, [1,3,3,1] binomial."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    if f.ndim != 1 or f.numel() < 1 or float(f.sum()) == 0:
        raise ValueError(f"resample_filter: expected a non-empty 1-D filter with a non-zero sum, got {taps!r}")
    return (torch.outer(f, f) / f.sum().square())[None, None]


class EDMConv2d(nn.Module):
    """Convolution with optional 2× FIR up/downsampling (EDM's ``Conv2d``; ``kernel=0`` resamples only).

    Upsampling is a stride-2 transposed depthwise convolution with 4·filter; downsampling a stride-2
    depthwise convolution with the filter. With ``fused_resample`` the 3×3 convolution runs at the high
    resolution (before downsampling, after upsampling), as NCSN++'s residual encoder does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused_resample: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("up/down: a convolution resamples in one direction only")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.up, self.down, self.fused_resample = bool(up), bool(down), bool(fused_resample)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("resample_filter", _fir_2d(resample_filter) if (up or down) else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if w is not None and self.fused_resample and self.up:
            up_f = (f * 4).expand(self.in_channels, 1, *f.shape[-2:])
            x = F.conv_transpose2d(x, up_f, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif w is not None and self.fused_resample and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.expand(self.out_channels, 1, *f.shape[-2:]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up_f = (f * 4).expand(self.in_channels, 1, *f.shape[-2:])
                x = F.conv_transpose2d(x, up_f, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.expand(self.in_channels, 1, *f.shape[-2:]), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:  # added after the convolution, as EDM does (same rounding)
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class EDMLinear(nn.Linear):
    """``nn.Linear`` that adds its bias after the product, as EDM's ``Linear`` does (same rounding)."""

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


def _group_norm(channels: int, eps: float) -> nn.GroupNorm:
    # EDM: 32 groups, but at least 4 channels per group.
    groups = min(32, channels // 4)
    if groups < 1:
        raise ValueError(f"channels: group normalisation needs at least 4 channels, got {channels}")
    return nn.GroupNorm(groups, channels, eps=eps)


class EDMUNetBlock(nn.Module):
    """Residual block (EDM's ``UNetBlock``): GN → SiLU → conv (with resampling) → embedding modulation
    (additive shift, or ADM's scale-and-shift) → GN → SiLU → dropout → conv, plus the (projected, resampled)
    skip, times ``skip_scale``; then optional multi-head self-attention with the same scaled residual."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads=None, channels_per_head: int = 64, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = int(in_channels), int(out_channels), int(emb_channels)
        # EDM's rule, including its edge case: fewer channels than one head means no attention at all.
        heads = int(num_heads) if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = float(dropout)
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = bool(adaptive_scale)
        self.norm0 = _group_norm(in_channels, eps)
        self.conv0 = EDMConv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = EDMLinear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = _group_norm(out_channels, eps)
        self.conv1 = EDMConv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = EDMConv2d(in_channels, out_channels, k, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"num_heads: {self.num_heads} heads do not divide {out_channels} channels")
            self.norm2 = _group_norm(out_channels, eps)
            self.qkv = EDMConv2d(out_channels, out_channels * 3, 1)
            self.proj = EDMConv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (orig if self.skip is None else self.skip(orig))
        x = x * self.skip_scale
        if self.num_heads:
            x = self.proj(self._attend(self.norm2(x))) + x
            x = x * self.skip_scale
        return x

    def _attend(self, h):
        # EDM lays qkv's 3C output channels out as (head, channel-in-head, q|k|v): channel (h·c + i)·3 + j.
        B, C, H, W = h.shape
        n, c = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(h).reshape(B, n, c, 3, H * W).unbind(3)          # each (B, n, c, HW)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2).reshape(B, C, H, W)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a scalar (Vaswani et al. 2017, Sec. 3.5): [cos(x·ω_k), sin(x·ω_k)] with
    ω_k = max_positions^(−k / (N/2 − endpoint)); DDPM++ uses ``endpoint=True``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = int(num_channels), max_positions, bool(endpoint)

    def forward(self, x):
        half = self.num_channels // 2
        k = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        omega = (1 / self.max_positions) ** k
        x = torch.outer(x, omega.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020), NCSN++'s noise embedding: the frequencies
    are a fixed buffer ``freqs`` drawn N(0, scale²) at construction and stored in the checkpoint."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.num_channels = int(num_channels)
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, ((2 * math.pi) * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ backbone ``F(x, c_noise, class_labels, augment_labels)`` (EDM's ``SongUNet``).

    Arguments and defaults are EDM's (a checkpoint that omits one means the default). Class labels are
    one-hot float rows (``None`` = all zeros); ``augment_labels=None`` is the same as zeros (no bias).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10, label_dropout: float = 0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter=(1, 1)):
        super().__init__()
        _check_choice("embedding_type", embedding_type, ("fourier", "positional"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        self.img_resolution = int(img_resolution)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.label_dim = self.num_classes = int(label_dim)
        self.augment_dim = int(augment_dim)
        self.label_dropout = float(label_dropout)  # recorded, never applied (see the module docstring)
        emb_ch = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        blk = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = EDMLinear(label_dim, noise_ch) if label_dim else None
        self.map_augment = EDMLinear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0 = EDMLinear(noise_ch, emb_ch)
        self.map_layer1 = EDMLinear(emb_ch, emb_ch)

        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(in_channels, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = EDMUNetBlock(cout, cout, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = EDMConv2d(caux, caux, 0, down=True,
                                                                  resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = EDMConv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = EDMConv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                      resample_filter=resample_filter)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = EDMUNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = EDMUNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = EDMUNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = EDMUNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions  # only the level's last decoder block
                self.dec[f"{res}x{res}_block{idx}"] = EDMUNetBlock(cin, cout, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = EDMConv2d(out_channels, out_channels, 0, up=True,
                                                                resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = _group_norm(cout, 1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = EDMConv2d(cout, out_channels, 3)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        """The mapping network: noise embedding (sin/cos halves swapped, as DDPM++ orders them), plus the
        label projection of √label_dim·onehot, plus the augmentation projection, then two SiLU layers."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def encode(self, x, emb) -> list:
        """The encoder's outputs, one per skip connection (the auxiliary skip/residual paths folded in), in
        order; the last one is the decoder's input. Feature extractors use this instead of walking ``enc``."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, EDMUNetBlock) else block(x)
                skips.append(x)
        return skips

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, w=None):
        if w is not None:
            raise ValueError("w: EDM architectures have no guidance-weight input")
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = self.encode(x, emb)
        x = skips[-1]
        aux, tmp = None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM backbone ``F(x, c_noise, class_labels, augment_labels)`` (EDM's ``DhariwalUNet``)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.img_resolution = int(img_resolution)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.label_dim = self.num_classes = int(label_dim)
        self.augment_dim = int(augment_dim)
        self.label_dropout = float(label_dropout)  # recorded, never applied (see the module docstring)
        emb_ch = model_channels * channel_mult_emb
        blk = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = EDMLinear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = EDMLinear(model_channels, emb_ch)
        self.map_layer1 = EDMLinear(emb_ch, emb_ch)
        self.map_label = EDMLinear(label_dim, emb_ch, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = EDMConv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = EDMUNetBlock(cout, cout, down=True, **blk)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = EDMUNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = EDMUNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = EDMUNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = EDMUNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = EDMUNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        self.out_norm = _group_norm(cout, 1e-5)
        self.out_conv = EDMConv2d(cout, out_channels, 3)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        """ADM's mapping: embedding → SiLU(layer0) → layer1, plus the (bias-free) label projection, → SiLU."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:  # no bias: None is the same as zeros
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        return F.silu(emb)

    def encode(self, x, emb) -> list:
        """The encoder's outputs, one per skip connection, in order; the last one is the decoder's input."""
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, EDMUNetBlock) else block(x)
            skips.append(x)
        return skips

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, w=None):
        if w is not None:
            raise ValueError("w: EDM architectures have no guidance-weight input")
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = self.encode(x, emb)
        x = skips[-1]
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

# Named configurations for ``getfast.models.create`` (EDM's ``train.py --arch`` presets). An imported
# checkpoint is recorded as "EDM-SongUNet"/"EDM-DhariwalUNet" plus its full constructor arguments.
CONFIGS = {
    "EDM-SongUNet": ("SongUNet", {}),
    "EDM-DhariwalUNet": ("DhariwalUNet", {}),
    "EDM-DDPMpp": ("SongUNet", dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                    channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                                    channel_mult=[2, 2, 2], dropout=0.13)),
    "EDM-NCSNpp": ("SongUNet", dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                    channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                                    channel_mult=[2, 2, 2], dropout=0.13)),
    "EDM-ADM": ("DhariwalUNet", dict(model_channels=192, channel_mult=[1, 2, 3, 4])),
}


def build(name: str, img_resolution: int, in_channels: int, num_classes: int = 0, **overrides) -> nn.Module:
    """``getfast.models.create`` hook: an EDM backbone by preset name; ``overrides`` are EDM constructor
    arguments (unknown ones raise TypeError)."""
    arch, kwargs = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    return ARCHITECTURES[arch](img_resolution=img_resolution, in_channels=in_channels,
                               out_channels=kwargs.pop("out_channels", in_channels), label_dim=num_classes, **kwargs)


__all__ = ["ARCHITECTURES", "CONFIGS", "DhariwalUNet", "EDMConv2d", "EDMLinear", "EDMUNetBlock", "FourierEmbedding",
           "PositionalEmbedding", "SongUNet", "build"]
