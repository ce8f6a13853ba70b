"""The teachers committed inside the package, by name (no torch import: the CLI checks names before any work)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"fashion-mnist": ASSETS / "teacher-fashion-mnist.safetensors"}

__all__ = ["ASSETS", "EMBEDDED"]
