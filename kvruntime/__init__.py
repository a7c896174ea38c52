"""kvruntime: never recompute what was already computed."""

from __future__ import annotations

__version__ = "0.1.0"
