"""Distillation methods, each a config dataclass + a method object for the shared loop.

A trained student is exported as safetensors with the metadata needed to rebuild it
(``save_student``) and loaded with ``load_student``: GET/ViT students map noise to images
directly; SIM/GDD generators are a teacher-shaped denoiser evaluated once at σ_init.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def _registry():
    from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod
    from getfast.methods.sim import SIMConfig, SIMMethod
    reg = {"get": (GETDistillConfig, GETDistillMethod), "sim": (SIMConfig, SIMMethod)}
    try:
        from getfast.methods.gdd import GDDConfig, GDDMethod
        reg["gdd"] = (GDDConfig, GDDMethod)
    except ImportError:
        pass
    try:
        from getfast.methods.guided import GuidedConfig, GuidedMethod
        reg["guided"] = (GuidedConfig, GuidedMethod)
    except ImportError:
        pass
    return reg


def student_meta(method) -> dict:
    """What ``load_student`` needs to rebuild ``method``'s product."""
    meta = {"method": method.config()["method"], "config": method.config(), "shape": list(method.shape),
            "num_classes": int(method.num_classes)}
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "meta"):
        meta["teacher_meta"] = teacher.meta
    return meta


def save_student(module: nn.Module, meta: dict, path) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"getfast_student": json.dumps(meta)})
    tmp.replace(path)


def build_student_from_meta(meta: dict) -> nn.Module:
    cfg = dict(meta["config"])
    method = cfg.pop("method")
    C, H, _ = meta["shape"]
    if method == "get":
        from getfast.methods.get_distill import GETDistillConfig, build_student
        return build_student(GETDistillConfig(**cfg), H, C, meta["num_classes"])
    if method in ("sim", "gdd"):
        from getfast.methods.sim import OneStepGenerator
        from getfast.teacher import build_denoiser
        tm = meta["teacher_meta"]
        den = build_denoiser(tm["model"], tm["resolution"], tm["channels"], tm["num_classes"], tm.get("label_dropout", 0.0))
        return OneStepGenerator(den, cfg["sigma_init"])
    if method == "guided":  # a w-conditioned copy of the teacher's denoiser, sampled with DDIM
        from getfast.teacher import build_denoiser
        tm = meta["teacher_meta"]
        return build_denoiser(tm["model"], tm["resolution"], tm["channels"], tm["num_classes"], 0.0,
                              **{**tm.get("overrides", {}), "w_cond": True})
    raise ValueError(f"cannot rebuild a student of method {method!r}")


def load_student(path, device="cpu") -> nn.Module:
    """A student from its ``student.safetensors`` (or a run folder holding one)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    p = Path(path)
    if p.is_dir():
        p = p / "student.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no student at {p}")
    with safe_open(str(p), "pt") as f:
        md = f.metadata() or {}
    if "getfast_student" not in md:
        raise ValueError(f"{p} is not a getfast student export")
    meta = json.loads(md["getfast_student"])
    net = build_student_from_meta(meta)
    net.load_state_dict(load_file(str(p)))
    net.meta = meta
    return net.eval().requires_grad_(False).to(device)


def is_student(path) -> bool:
    p = Path(path)
    return (p / "student.safetensors").exists() if p.is_dir() else p.name.endswith(".safetensors") and _has_key(p)


def _has_key(p: Path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(p), "pt") as f:
            return "getfast_student" in (f.metadata() or {})
    except Exception:  # not a safetensors file: let the caller's loader report it
        return False
