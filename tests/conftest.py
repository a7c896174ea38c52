"""Shared test set-up. Tests import only ``kvruntime.*``, never the bare folders."""

from __future__ import annotations

import os

# Triton's CPU interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
