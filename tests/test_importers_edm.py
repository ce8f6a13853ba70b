"""NVlabs/edm pickles as getfast teachers.

The pickles here are written offline in EDM's format by a small test-only re-implementation of EDM's
networks (below, independent of getfast.models.edm_unets): every network class pickles, as EDM's
``torch_utils.persistence`` does, as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
meta = {type, version, module_src, class_name, state}, the state being the module's ``__dict__`` with
its recorded constructor arguments. The reference also computes EDM's D(x; σ, labels) for the parity checks.
"""
import copy
import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from getfast.importers import ConvertConfig, UnsafePickleError, convert, load_edm_pickle

pytestmark = pytest.mark.usefixtures("one_thread_module")

# --- a test-only EDM reference, pickled in EDM's persistence format ------------------------------------

_SRC = "# stand-in for the embedded module source; the reader must never execute it\nraise SystemExit('ran')\n"


def _reconstruct_persistent_obj(meta):  # what the pickle names; only referenced, never called by the reader
    raise AssertionError("the reader must not call the pickled reconstruct function")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@pytest.fixture(autouse=True)
def _persistence_module(monkeypatch):
    """``pickle`` records functions by module path: make ``torch_utils.persistence`` resolvable while writing."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)


class Persistent(nn.Module):
    """Records constructor arguments and pickles like an EDM persistent class."""

    def _record(self, args, kwargs):
        self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

    def __deepcopy__(self, memo):  # plain copy: ``__reduce__`` below is for pickling only
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=_SRC, class_name=type(self).__name__,
                    state=self.__getstate__())
        return (_reconstruct_persistent_obj, (meta,), None)


class Linear(Persistent):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self._record(args, kwargs)
        a = dict(zip(["in_features", "out_features", "bias"], args), **kwargs)
        self.in_features, self.out_features = a["in_features"], a["out_features"]
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features) / math.sqrt(self.in_features))
        self.bias = nn.Parameter(0.1 * torch.randn(self.out_features)) if a.get("bias", True) else None

    def forward(self, x):
        y = torch.einsum("bi,oi->bo", x, self.weight)
        return y if self.bias is None else y + self.bias


class Conv2d(Persistent):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False):
        super().__init__()
        self._record((), dict(in_channels=in_channels, out_channels=out_channels, kernel=kernel, bias=bias, up=up,
                              down=down, resample_filter=list(resample_filter), fused_resample=fused_resample))
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = fused_resample
        fan = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(max(fan, 1))) \
            if kernel else None
        self.bias = nn.Parameter(0.1 * torch.randn(out_channels)) if kernel and bias else None
        f = torch.tensor(resample_filter, dtype=torch.float32)
        fir = (f[:, None] * f[None, :] / f.sum() ** 2)[None, None]
        self.register_buffer("resample_filter", fir if up or down else None)

    def _up(self, x):
        c = x.shape[1]
        k = self.resample_filter.shape[-1]
        return F.conv_transpose2d(x, 4 * self.resample_filter.repeat(c, 1, 1, 1), stride=2, groups=c,
                                  padding=(k - 1) // 2)

    def _down(self, x, pad):
        c = x.shape[1]
        return F.conv2d(x, self.resample_filter.repeat(c, 1, 1, 1), stride=2, groups=c, padding=pad)

    def forward(self, x):
        k = 0 if self.weight is None else self.weight.shape[-1]
        fk = 0 if self.resample_filter is None else self.resample_filter.shape[-1]
        if self.fused_resample and self.down and k:  # conv at full resolution, then filter + decimate
            x = self._down(F.conv2d(x, self.weight, padding=k // 2 + (fk - 1) // 2), 0)
        else:
            if self.up:
                x = self._up(x)
            if self.down:
                x = self._down(x, (fk - 1) // 2)
            if k:
                x = F.conv2d(x, self.weight, padding=k // 2)
        return x if self.bias is None else x + self.bias[None, :, None, None]


class GroupNorm(Persistent):
    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self._record((), dict(num_channels=num_channels, eps=eps))
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x):
        B, C = x.shape[:2]
        h = x.reshape(B, self.num_groups, -1)
        h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        return h.reshape(x.shape) * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class UNetBlock(Persistent):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=None,
                 channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True):
        super().__init__()
        self._record((), {k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            h = F.silu(self.norm1(h) * (1 + p[:, : h.shape[1]]) + p[:, h.shape[1]:])
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(h)
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            B, C, H, W = h.shape
            qkv = self.qkv(self.norm2(h)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            att = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1]), dim=2)
            a = torch.einsum("nqk,nck->ncq", att, v).reshape(B, C, H, W)
            h = (self.proj(a) + h) * self.skip_scale
        return h


class PositionalEmbedding(Persistent):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self._record((), dict(num_channels=num_channels, max_positions=max_positions, endpoint=endpoint))
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        n = self.num_channels // 2
        f = torch.exp(-math.log(self.max_positions) * torch.arange(n) / (n - int(self.endpoint)))
        a = x[:, None] * f[None]
        return torch.cat([a.cos(), a.sin()], 1)


class FourierEmbedding(Persistent):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self._record((), dict(num_channels=num_channels, scale=scale))
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        a = x[:, None] * (2 * math.pi * self.freqs)[None]
        return torch.cat([a.cos(), a.sin()], 1)


class SongUNet(Persistent):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.1,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        self._record((), {k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.label_dropout = label_dropout
        E, N = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        bk = dict(emb_channels=E, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        positional = embedding_type == "positional"
        self.map_noise = PositionalEmbedding(N, endpoint=True) if positional else FourierEmbedding(N)
        self.map_label = Linear(label_dim, N) if label_dim else None
        self.map_augment = Linear(augment_dim, N, bias=False) if augment_dim else None
        self.map_layer0, self.map_layer1 = Linear(N, E), Linear(E, E)
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        c, caux, skips = in_channels, in_channels, []
        for lvl, m in enumerate(channel_mult):
            r = img_resolution >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **bk)
                if encoder_type == "skip":
                    self.enc[f"{r}x{r}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{r}x{r}_aux_skip"] = Conv2d(caux, c, 1)
                if encoder_type == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = Conv2d(caux, c, 3, down=True, resample_filter=resample_filter,
                                                               fused_resample=True)
                    caux = c
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * m, attention=r in attn_resolutions, **bk)
                c = model_channels * m
                skips.append(c)
        for lvl, m in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> lvl
            if lvl == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **bk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **bk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **bk)
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * m,
                                                          attention=i == num_blocks and r in attn_resolutions, **bk)
                c = model_channels * m
            if decoder_type == "skip" or lvl == 0:
                if decoder_type == "skip" and lvl < len(channel_mult) - 1:
                    self.dec[f"{r}x{r}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                         resample_filter=resample_filter)
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        e = self.map_noise(noise_labels)
        half = e.shape[1] // 2
        e = torch.cat([e[:, half:], e[:, :half]], 1)  # sin first
        if self.map_label is not None:
            e = e + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        e = F.silu(self.map_layer1(F.silu(self.map_layer0(e))))
        skips, aux = [], x
        for name, blk in self.enc.items():
            if "aux_down" in name:
                aux = blk(aux)
            elif "aux_skip" in name:
                x = x + blk(aux)
                skips[-1] = x
            elif "aux_residual" in name:
                x = aux = (x + blk(aux)) / math.sqrt(2)
                skips[-1] = x
            else:
                x = blk(x, e) if isinstance(blk, UNetBlock) else blk(x)
                skips.append(x)
        out, t = None, None
        for name, blk in self.dec.items():
            if "aux_up" in name:
                out = blk(out)
            elif "aux_norm" in name:
                t = blk(x)
            elif "aux_conv" in name:
                t = blk(F.silu(t))
                out = t if out is None else out + t
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], 1)
                x = blk(x, e)
        return out


class DhariwalUNet(Persistent):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1,
                 label_dropout=0):
        super().__init__()
        self._record((), {k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.label_dropout = label_dropout
        E = model_channels * channel_mult_emb
        bk = dict(emb_channels=E, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0, self.map_layer1 = Linear(model_channels, E), Linear(E, E)
        self.map_label = Linear(label_dim, E, bias=False) if label_dim else None
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        c, skips = in_channels, []
        for lvl, m in enumerate(channel_mult):
            r = img_resolution >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels * m, 3)
                c = model_channels * m
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, down=True, **bk)
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * m, attention=r in attn_resolutions, **bk)
                c = model_channels * m
                skips.append(c)
        for lvl, m in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> lvl
            if lvl == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, attention=True, **bk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, **bk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, up=True, **bk)
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * m,
                                                          attention=r in attn_resolutions, **bk)
                c = model_channels * m
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        e = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        e = self.map_layer1(F.silu(self.map_layer0(e)))
        if self.map_label is not None:
            e = e + self.map_label(class_labels)
        e = F.silu(e)
        skips = []
        for blk in self.enc.values():
            x = blk(x, e) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for name, blk in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], 1)
            x = blk(x, e)
        return self.out_conv(F.silu(self.out_norm(x)))


_NETS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class _Precond(Persistent):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="SongUNet", out_mult=1,
                 **kw):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.model = _NETS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=out_mult * img_channels, label_dim=label_dim, **kw)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        if self.label_dim:
            class_labels = torch.zeros(1, self.label_dim) if class_labels is None else class_labels
        c_skip, c_out, c_in, c_noise = self.coeffs(s)
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels)[:, : self.img_channels]


class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5, model_type="DhariwalUNet", **kw):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **kw)
        self._record((), dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                              use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                              model_type=model_type, **kw))
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coeffs(self, s):
        sd = self.sigma_data
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt(), s.log() / 4


class VPPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type="SongUNet", **kw):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **kw)
        self._record((img_resolution, img_channels), dict(label_dim=label_dim, use_fp16=use_fp16, beta_d=beta_d,
                                                          beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                                                          model_type=model_type, **kw))
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t

    def coeffs(self, s):
        # t(σ): root of ½β_d t² + β_min t − ln(1+σ²) = 0
        t = ((self.beta_min**2 + 2 * self.beta_d * torch.log(1 + s**2)).sqrt() - self.beta_min) / self.beta_d
        return torch.ones_like(s), -s, 1 / (1 + s**2).sqrt(), (self.M - 1) * t


class VEPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **kw):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **kw)
        self._record((), dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                              use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, model_type=model_type, **kw))
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coeffs(self, s):
        return torch.ones_like(s), s, torch.ones_like(s), torch.log(s / 2)


class iDDPMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type="DhariwalUNet", **kw):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, out_mult=2, **kw)
        self._record((), dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                              use_fp16=use_fp16, C_1=C_1, C_2=C_2, M=M, model_type=model_type, **kw))
        self.C_1, self.C_2, self.M = C_1, C_2, M
        abar = [math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2 for j in range(M + 1)]
        u = [0.0] * (M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
        self.register_buffer("u", torch.tensor(u, dtype=torch.float32))

    def coeffs(self, s):
        idx = (s.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(1).reshape(s.shape)
        return torch.ones_like(s), -s, 1 / (1 + s**2).sqrt(), (self.M - 1 - idx).float()


def _write(tmp_path, net, name="net.pkl", protocol=pickle.DEFAULT_PROTOCOL):
    path = tmp_path / name
    with open(path, "wb") as f:  # the layout of EDM's network-snapshot-*.pkl
        pickle.dump(dict(ema=copy.deepcopy(net).eval().requires_grad_(False), loss_fn=None, augment_pipe=None,
                         dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="data.zip")),
                    f, protocol=protocol)
    return path


SONG = dict(model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
CASES = {
    "edm-ddpmpp-cond-augment": (EDMPrecond, dict(SONG, label_dim=4, augment_dim=9, dropout=0.13)),
    "vp-ddpmpp": (VPPrecond, dict(SONG, num_blocks=2, channel_mult_noise=1, resample_filter=[1, 1])),
    "ve-ncsnpp": (VEPrecond, dict(SONG, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                  resample_filter=[1, 3, 3, 1])),
    "edm-ncsnpp-skip-skip": (EDMPrecond, dict(SONG, label_dim=3, embedding_type="fourier", channel_mult_noise=2,
                                              encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1],
                                              channel_mult=[1, 2, 2], attn_resolutions=[2])),
    "edm-adm-cond-augment": (EDMPrecond, dict(model_type="DhariwalUNet", label_dim=4, augment_dim=9, model_channels=32,
                                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4])),
    "iddpm-adm-cond": (iDDPMPrecond, dict(model_type="DhariwalUNet", label_dim=4, model_channels=32,
                                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    "vp-adm": (VPPrecond, dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 1], num_blocks=1,
                               attn_resolutions=[8])),
}


def _make(case, res=8, channels=3, seed=0):
    cls, kw = CASES[case]
    torch.manual_seed(seed)
    return cls(img_resolution=res, img_channels=channels, **kw).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_edm_pickle_matches_reference(tmp_path, case):
    ref = _make(case)
    D = load_edm_pickle(_write(tmp_path, ref))
    g = torch.Generator().manual_seed(1)
    K = ref.label_dim
    labels = torch.randint(0, K, (5,), generator=g) if K else None
    onehot = F.one_hot(labels, K).float() if K else None
    with torch.no_grad():
        for s in (0.002, 0.1, 1.0, 10.0, 80.0):
            x = (1 + s) * torch.randn(5, 3, 8, 8, generator=g)
            sigma = torch.full((5,), s)
            want, got = ref(x, sigma, onehot), D(x, sigma, labels)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 2e-5, f"{case} at sigma={s}: relative error {err:.2e}"
            if K:  # one-hot rows and "no label" (None) behave as EDM's zero label row
                assert torch.equal(D(x, sigma, onehot), got)
                assert torch.allclose(D(x, sigma, None), ref(x, sigma, None), rtol=0, atol=2e-5 * want.abs().max())
    m = D.meta
    assert (m["resolution"], m["channels"], m["num_classes"]) == (8, 3, K)
    arch = "EDM-" + CASES[case][1]["model_type"]
    assert m["precond"]["type"] == type(ref).__name__
    assert m["model"] == (arch if m["precond"]["type"] == "EDMPrecond" else f"{arch}/{m['precond']['type']}")
    assert len(m["source"]["sha256"]) == 64 and not any(p.requires_grad for p in D.parameters())


def test_teacher_load_routes_pickles_and_samples(tmp_path):
    from getfast.diffusion import heun
    from getfast.teacher import load
    path = _write(tmp_path, _make("edm-ddpmpp-cond-augment"))
    D = load(str(path))
    z = torch.randn(2, 3, 8, 8)
    x = heun(D, z, steps=2, class_labels=torch.tensor([0, 3]))
    assert x.shape == z.shape and torch.isfinite(x).all()


def test_older_pickle_protocols(tmp_path):
    ref = _make("ve-ncsnpp")
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0])
    for proto in (2, 3):
        D = load_edm_pickle(_write(tmp_path, ref, f"p{proto}.pkl", protocol=proto))
        torch.testing.assert_close(D(x, s), ref(x, s), rtol=2e-5, atol=2e-5)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_unknown_globals_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(marker)}))
    with pytest.raises(UnsafePickleError, match="refusing to load 'io.open'"):
        load_edm_pickle(path)
    assert not marker.exists()
    # the embedded module source is never executed (it would raise SystemExit)
    load_edm_pickle(_write(tmp_path, _make("vp-ddpmpp")))


def test_bad_pickles_give_clear_errors(tmp_path):
    net = _make("vp-ddpmpp")
    p = tmp_path / "noema.pkl"
    p.write_bytes(pickle.dumps({"loss_fn": None}))
    with pytest.raises(ValueError, match="no 'ema' entry"):
        load_edm_pickle(p)
    p.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable EDM pickle"):
        load_edm_pickle(p)
    # an attribute the importer does not reproduce (a modified architecture) is caught before loading weights
    bad = copy.deepcopy(net)
    bad.model.enc["8x8_block0"].skip_scale = 1.0
    with pytest.raises(ValueError, match="skip_scale"):
        load_edm_pickle(_write(tmp_path, bad, "bad.pkl"))
    # a weight of the wrong shape
    bad = copy.deepcopy(net)
    bad.model.map_layer0.weight = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="do not fit"):
        load_edm_pickle(_write(tmp_path, bad, "bad2.pkl"))
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(tmp_path / "missing.pkl")


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_convert_writes_a_getfast_teacher(tmp_path, dtype, tol):
    from getfast.teacher import load
    ref = _make("ve-ncsnpp")
    src = _write(tmp_path, ref)
    out = convert(ConvertConfig(src=str(src), out=str(tmp_path / "t.safetensors"), dtype=dtype))
    assert out.with_suffix(".md").exists() and "VEPrecond" in out.with_suffix(".md").read_text()
    D, D0 = load(str(out)), load_edm_pickle(src)
    assert all(p.dtype == torch.float32 for p in D.parameters())
    x, s = torch.randn(3, 3, 8, 8), torch.tensor([0.05, 1.0, 30.0])
    err = ((D(x, s) - D0(x, s)).abs().max() / D0(x, s).abs().max()).item()
    assert err <= tol
    assert D.meta["precond"] == D0.meta["precond"]
    with pytest.raises(ValueError, match="out"):
        convert(ConvertConfig(src=str(src), out=str(tmp_path / "t.pt")))
    with pytest.raises(ValueError, match="dtype"):
        convert(ConvertConfig(src=str(src), out=str(tmp_path / "t.safetensors"), dtype="int8"))


def test_sim_distils_from_an_edm_teacher(tmp_path, monkeypatch):
    from getfast.methods.sim import SIMConfig, SIMMethod
    monkeypatch.setenv("GETFAST_BACKEND", "reference")  # the teacher is under test here, not the fused kernels
    D = load_edm_pickle(_write(tmp_path, _make("edm-ddpmpp-cond-augment")))
    m = SIMMethod(SIMConfig(), teacher=D)
    m.setup(lambda mod: mod)
    seen = set()
    for group in m.losses(2, 0):  # the loop's contract: {optimizer name: loss}, backward per yield
        for name, loss in group.items():
            m.optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in m.modules[name].parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            seen.add(name)
    assert seen == {"fake", "generator"}


@pytest.mark.parametrize("case", ["vp-ddpmpp", "ve-ncsnpp"])
def test_students_of_vp_and_ve_teachers_reload(tmp_path, case):
    """A student exported from an imported VP/VE teacher rebuilds the same network (preconditioning included)."""
    from getfast.methods import load_student, save_student, student_meta
    from getfast.methods.sim import SIMConfig, SIMMethod
    D = load_edm_pickle(_write(tmp_path, _make(case)))
    m = SIMMethod(SIMConfig(), teacher=D)
    gen = m.modules["generator"]
    path = save_student(gen, student_meta(m), tmp_path / "student.safetensors")
    back = load_student(path)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(z), gen.eval()(z))
    assert type(back.denoiser).__name__ == type(D).__name__


@pytest.mark.parametrize("case", ["ve-ncsnpp", "edm-ncsnpp-skip-skip", "edm-adm-cond-augment"])
def test_gdd_discriminator_reads_imported_encoders(tmp_path, case):
    """GDD's teacher-encoder features work on imported networks whose encoders have skip/residual side paths."""
    from getfast.methods.gdd import TeacherEncoderFeatures
    D = load_edm_pickle(_write(tmp_path, _make(case)))
    feats = TeacherEncoderFeatures(D)
    out = feats(torch.randn(2, 3, 8, 8))
    assert [o.shape[-1] for o in out] == sorted({o.shape[-1] for o in out}, reverse=True)
    assert all(torch.isfinite(o).all() for o in out) and len(out) == len(feats.channels)
