"""Distillation methods, each a config dataclass + a method object for the shared loop (``getfast.train``).

``METHODS`` maps a ``getfast distill`` subcommand to its (config class, method class). A trained student is
exported as safetensors with the metadata needed to rebuild it and loaded with ``load_student``
(:mod:`getfast.methods.students`).
"""
from __future__ import annotations

from getfast.methods.gdd import GDDConfig, GDDMethod
from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod
from getfast.methods.guided import GuidedConfig, GuidedMethod
from getfast.methods.sim import SIMConfig, SIMMethod
from getfast.methods.students import (build_student_from_meta, is_student, load_student, save_student,
                                      student_meta)

METHODS = {"get": (GETDistillConfig, GETDistillMethod), "sim": (SIMConfig, SIMMethod),
           "gdd": (GDDConfig, GDDMethod), "guided": (GuidedConfig, GuidedMethod)}


def _registry() -> dict:
    """``METHODS`` (the name the CLI used before it was a plain dict)."""
    return dict(METHODS)


__all__ = ["METHODS", "GDDConfig", "GDDMethod", "GETDistillConfig", "GETDistillMethod", "GuidedConfig",
           "GuidedMethod", "SIMConfig", "SIMMethod", "build_student_from_meta", "is_student", "load_student",
           "save_student", "student_meta"]
