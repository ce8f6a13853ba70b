"""``getfast convert``: an outside teacher (NVlabs/edm pickle, diffusers folder) -> a getfast teacher file
(``.safetensors`` with the ``getfast`` metadata that ``getfast.teacher.load`` reads) plus a model card."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertConfig:
    """Convert a teacher from another format (NVlabs/edm pickle, diffusers folder) into a getfast teacher file."""

    src: str = field(default="", metadata={"aliases": ("--from",)})  # EDM .pkl (network-snapshot or released checkpoint) or a diffusers pipeline/UNet folder
    out: str = ""            # output .safetensors; a model card (.md and .json) is written beside it
    key: str = "ema"         # which entry of an EDM training snapshot to convert
    dtype: str = "float32"   # on-disk weight precision: float32 | float16 | bfloat16 (loading upcasts to float32)


def build_denoiser_from_meta(meta: dict, **overrides) -> nn.Module:
    """A fresh (untrained) denoiser of the architecture ``meta`` describes, for any teacher getfast loads:
    imported EDM networks (``meta['precond']``), diffusers UNets (``meta['diffusers']``) and getfast's own
    (``build_denoiser`` with ``meta['overrides']``). ``overrides`` change architecture arguments."""
    if "precond" in meta:
        from getfast.importers.edm import build_from_meta
        return build_from_meta({**meta, "overrides": {**meta.get("overrides", {}), **overrides}})
    if "diffusers" in meta:
        if overrides:
            raise ValueError(f"overrides {sorted(overrides)}: a diffusers teacher's architecture cannot be changed")
        from getfast.importers.hf_diffusers import build_from_meta
        return build_from_meta(meta)
    from getfast.models import build_denoiser
    return build_denoiser(meta["model"], meta["resolution"], meta["channels"], meta["num_classes"],
                          **{**meta.get("overrides", {}), **overrides})


def load_source(src: str, key: str = "ema", device="cpu") -> nn.Module:
    """The denoiser in ``src``: an EDM pickle or a diffusers folder."""
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"src: no such file or folder: {src}")
    from getfast.importers.hf_diffusers import is_diffusers_dir
    if p.is_dir():
        if not is_diffusers_dir(p):
            raise ValueError(f"src: {src} is a folder without a diffusers model_index.json or UNet config.json")
        from getfast.importers.hf_diffusers import load_diffusers
        return load_diffusers(p, device=device)
    from getfast.importers.edm import load_edm_pickle
    return load_edm_pickle(p, device=device, key=key)


def save_teacher(net: nn.Module, meta: dict, path, dtype: str = "float32") -> Path:
    """Write ``net``'s weights as safetensors with ``getfast`` metadata (atomically). With a half ``dtype``
    the floating-point *parameters* are stored in half; buffers (e.g. Fourier frequencies, whose rounding
    would shift phases) stay float32. ``getfast.teacher.load`` upcasts on load."""
    from getfast.io import atomic_write_bytes
    from getfast.weights import weights_bytes
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    params = {n for n, _ in net.named_parameters()}
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if k in params and v.is_floating_point():
            v = v.to(DTYPES[dtype])
        state[k] = v.contiguous()
    # atomically, mode 0644, with the sha256 of its weights that every loader checks (getfast.weights)
    return atomic_write_bytes(path, weights_bytes(state, {"getfast": json.dumps(meta)}), mode=0o644)


def _card(net: nn.Module, meta: dict, cfg: ConvertConfig, out: Path) -> None:
    n_params = sum(p.numel() for p in net.parameters())
    src = meta.get("source", {})
    card = {"title": f"{meta['model']} teacher converted from {Path(cfg.src).name}", "weights": out.name,
            "command": f"getfast convert --src {cfg.src} --out {cfg.out} --key {cfg.key} --dtype {cfg.dtype}",
            "params": n_params, "on_disk_dtype": cfg.dtype, "source": src,
            "architecture": {k: meta[k] for k in ("model", "resolution", "channels", "num_classes", "overrides")
                             if k in meta},
            "preconditioning": meta.get("precond", {"type": "VP (diffusers scheduler)"} if "diffusers" in meta else {}),
            "convert_config": asdict(cfg)}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    md = [f"# {card['title']}\n", f"Weights: `{out.name}` ({cfg.dtype} on disk, float32 when loaded)\n",
          "Command:\n", f"```\n{card['command']}\n```\n",
          f"- source: {src.get('format')} `{src.get('file', Path(cfg.src).name)}`"
          + (f", sha256 `{src['sha256']}`" if "sha256" in src else ""),
          f"- backbone: {meta['model']} {json.dumps(meta.get('overrides', {}))}",
          f"- preconditioning: {json.dumps(card['preconditioning'])}",
          f"- resolution {meta['resolution']}, channels {meta['channels']}, classes {meta['num_classes']}, "
          f"params {n_params:,}",
          "- the source's own code was not run: the weights were read with getfast's restricted reader and "
          "loaded into getfast's modules"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def convert(cfg: ConvertConfig) -> Path:
    """Read ``cfg.src`` and write a getfast teacher to ``cfg.out`` (+ ``.md``/``.json`` card); returns the path."""
    if not cfg.src:
        raise ValueError("src: give the EDM .pkl or diffusers folder to convert")
    if not cfg.out.endswith(".safetensors"):
        raise ValueError(f"out: expected a .safetensors path, got {cfg.out!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    net = load_source(cfg.src, key=cfg.key)
    meta = dict(net.meta)
    out = save_teacher(net, meta, cfg.out, cfg.dtype)
    _card(net, meta, cfg, out)
    return out


def is_foreign_teacher(path) -> bool:
    """Whether ``getfast.teacher.load`` should hand ``path`` to an importer: a ``.pkl`` (NVlabs/edm) file or a
    diffusers pipeline/UNet folder."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".pkl"
    from getfast.importers.hf_diffusers import is_diffusers_dir
    return p.is_dir() and is_diffusers_dir(p)


def load_converted(path, state: dict, meta: dict, device="cpu") -> nn.Module:
    """A teacher written by ``convert``: rebuild from ``meta``, load ``state`` (half weights are upcast)."""
    from getfast.weights import load_state
    try:
        net = build_denoiser_from_meta(meta)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: its metadata describes no network getfast can build ({e})") from None
    load_state(net, state, path)
    net.meta = meta
    return net.eval().requires_grad_(False).to(device)
