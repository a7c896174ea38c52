"""kvruntime: never recompute what was already computed.

``Runtime.from_pretrained("smollm2")`` loads a model; ``rt.session().chat(messages)`` runs a
turn that reuses every cached prefix (device, host, Redis). See DESIGN.md for the layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported on first use, so ``import kvruntime.radix`` (or the CLI's --help) stays light.
_LAZY = {
    "Runtime": "kvruntime.runtime",
    "Client": "kvruntime.client",
    "AsyncClient": "kvruntime.client",
    "RuntimeConfig": "kvruntime.config",
    "Session": "kvruntime.session",
    "ChatResult": "kvruntime.results",
    "Usage": "kvruntime.results",
    "Timings": "kvruntime.results",
    "Stats": "kvruntime.analytics",
    "TurnRecord": "kvruntime.analytics",
    "KVRuntimeError": "kvruntime.errors",
    "BadRequest": "kvruntime.errors",
    "Overloaded": "kvruntime.errors",
    "StoreUnavailable": "kvruntime.errors",
    "CorruptPage": "kvruntime.errors",
}

if TYPE_CHECKING:
    from kvruntime.analytics import Stats, TurnRecord
    from kvruntime.client import AsyncClient, Client
    from kvruntime.config import RuntimeConfig
    from kvruntime.errors import (
        BadRequest,
        CorruptPage,
        KVRuntimeError,
        Overloaded,
        StoreUnavailable,
    )
    from kvruntime.results import ChatResult, Timings, Usage
    from kvruntime.runtime import Runtime
    from kvruntime.session import Session


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvruntime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AsyncClient",
    "BadRequest",
    "ChatResult",
    "Client",
    "CorruptPage",
    "KVRuntimeError",
    "Overloaded",
    "Runtime",
    "RuntimeConfig",
    "Session",
    "Stats",
    "StoreUnavailable",
    "Timings",
    "TurnRecord",
    "Usage",
    "__version__",
]
