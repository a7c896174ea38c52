"""Model engines: compute only the uncached suffix of a prompt on top of restored KV.

``models`` loads weights (aliases, GGUF conversion cache, fingerprint), ``chat`` renders
messages to token ids, ``base`` is the engine interface and ``transformers`` implements it.
Importing this package does not import transformers; the modules that need it do, lazily.
"""

from __future__ import annotations

from kvruntime.engines.base import Engine, GeneratedToken, KVPrefix, KVState, PrefillResult
from kvruntime.engines.models import MODELS, KVShape, LoadedModel, load_model

__all__ = [
    "MODELS",
    "Engine",
    "GeneratedToken",
    "KVPrefix",
    "KVShape",
    "KVState",
    "LoadedModel",
    "PrefillResult",
    "load_model",
]
