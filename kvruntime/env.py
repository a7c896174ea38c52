"""The one place where kvruntime reads environment variables (prefix ``KVR_``).

Everything else takes values from config dataclasses; these are defaults a user can override
without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvruntime.errors import ConfigError

KERNEL_BACKENDS = ("auto", "torch", "triton")


def kernel_backend() -> str:
    """``KVR_KERNELS``: ``torch`` forces the torch reference, ``triton`` the Triton kernels,
    ``auto`` (default) picks Triton on CUDA tensors and the reference on CPU tensors.
    Read at call time, so tests may switch it."""
    value = os.environ.get("KVR_KERNELS", "auto").strip().lower() or "auto"
    if value not in KERNEL_BACKENDS:
        raise ConfigError(f"KVR_KERNELS={value!r}; expected one of {', '.join(KERNEL_BACKENDS)}")
    return value


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> Path:
    """``KVR_CACHE_DIR``: where converted model weights and calibrations are cached."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvruntime"
    return Path(os.environ.get("KVR_CACHE_DIR", str(default)))


def redis_server_binary() -> str | None:
    """``KVR_REDIS_SERVER``: path of a ``redis-server`` binary to use in tests and benchmarks."""
    return os.environ.get("KVR_REDIS_SERVER") or None
