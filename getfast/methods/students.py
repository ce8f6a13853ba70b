"""Exported students: ``student.safetensors`` holds the EMA weights and the metadata that rebuilds the network.

GET/ViT students map noise to images directly; SIM/GDD generators are a teacher-shaped denoiser evaluated once
at σ_init (:class:`getfast.models.onestep.OneStepGenerator`); guided students are w-conditioned copies of the
teacher's denoiser, sampled with DDIM.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from getfast.importers import build_denoiser_from_meta
from getfast.models import create
from getfast.models.onestep import OneStepGenerator
from getfast.train.export import save_weights

KEY = "getfast_student"

# The fields of a GET distillation config that shape the student network (they override its GETConfig).
GET_ARCH_FIELDS = ("solver", "grad", "grad_steps", "eval_iters", "train_solver_iters", "tau", "z_init", "state")


def build_get_student(model: str, resolution: int, channels: int, num_classes: int, config: dict) -> nn.Module:
    """A GET or ViT student; for a GET, the set (truthy) ``GET_ARCH_FIELDS`` of ``config`` override its GETConfig."""
    overrides = {k: config[k] for k in GET_ARCH_FIELDS if config.get(k)} if model.startswith("GET") else {}
    return create(model, img_resolution=resolution, in_channels=channels, num_classes=num_classes, **overrides)


def student_meta(method) -> dict:
    """What ``load_student`` needs to rebuild ``method``'s product."""
    meta = {"method": method.config()["method"], "config": method.config(), "shape": list(method.shape),
            "num_classes": int(method.num_classes)}
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "meta"):
        meta["teacher_meta"] = teacher.meta
    return meta


def save_student(module: nn.Module, meta: dict, path) -> Path:
    """Write a student's weights with its metadata (atomically, mode 0644)."""
    return save_weights(module, path, {KEY: json.dumps(meta)})


def build_student_from_meta(meta: dict) -> nn.Module:
    cfg = dict(meta["config"])
    method = cfg.pop("method")
    C, H, _ = meta["shape"]
    if method == "get":
        return build_get_student(cfg["model"], H, C, meta["num_classes"], cfg)
    tm = meta.get("teacher_meta")
    if tm is None:
        raise ValueError(f"a {method!r} student export must record its teacher's architecture (teacher_meta)")
    if method in ("sim", "gdd"):
        den = build_denoiser_from_meta(tm)  # getfast's own, an imported EDM network or a diffusers UNet
        return OneStepGenerator(den, cfg["sigma_init"])
    if method == "guided":  # a w-conditioned copy of the teacher's denoiser, sampled with DDIM
        return build_denoiser_from_meta(tm, w_cond=True)
    raise ValueError(f"cannot rebuild a student of method {method!r}")


def load_student(path, device="cpu") -> nn.Module:
    """A student from its ``student.safetensors`` (or a run folder holding one), in eval mode."""
    from getfast.weights import check_student_meta, json_metadata, load_state, read_weights
    p = Path(path)
    if p.is_dir():
        p = p / "student.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no student at {p}")
    state, md = read_weights(p)  # its checksum is verified here
    meta = check_student_meta(json_metadata(md, KEY, p, "a student exported by getfast distill"), p)
    try:
        net = build_student_from_meta(meta)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{p}: its metadata describes no network getfast can build ({e})") from None
    load_state(net, state, p)
    net.meta = meta
    return net.eval().requires_grad_(False).to(device)


def is_student(path) -> bool:
    p = Path(path)
    return (p / "student.safetensors").exists() if p.is_dir() else p.name.endswith(".safetensors") and _has_key(p)


def _has_key(p: Path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(p), "pt") as f:
            return KEY in (f.metadata() or {})
    except Exception:  # not a safetensors file: let the caller's loader report it
        return False
