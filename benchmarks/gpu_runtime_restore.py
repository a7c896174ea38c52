"""The runtime's own restore path on the GPU: a resumed turn through ``KVCache``, for bench_gpu.

The prefix's pages go into a ``KVCache`` the way a turn's commit puts them there (a device
pool of one page, so the rest spill to the host tier: pinned rows, codec ``none``); the next
turn's ``lookup`` finds 1 device page and the rest in the host tier. Timed, synced start to
synced first-token logits:

- ``up_front``: ``restore(found, ...)``, the path the runtime has taken so far: every page
  decoded into one page-first tensor (host pages by one rehydrate launch from the pinned rows),
  then ``prefill(tokens, KVPrefix)``, which copies the pages into per-layer caches;
- ``layered``: ``restore(found, ..., layered=True)``: host pages stay in the tier, the engine
  loads them layer by layer beside its forward (``HostKVPrefix``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel, TierCost
from kvruntime.engines.layered import HostKVPrefix
from kvruntime.engines.transformers import TransformersEngine
from kvruntime.kvcache import KVCache


def runtime_restore(
    eng: TransformersEngine,
    pages: torch.Tensor,
    tokens: list[int],
    prefix_tokens: int,
    wall: Callable[[Callable[[], object], int], float],
    reps: int = 3,
) -> dict[str, Any]:
    """TTFT of the turn ``tokens`` whose first ``prefix_tokens`` tokens' pages (``pages``
    ``[n, L, 2, H, P, D]`` on the device) a ``KVCache`` holds, by restore path."""
    n, P = pages.shape[0], pages.shape[4]
    layout = eng.layout.page_layout(P, eng.dtype)
    config = RuntimeConfig(
        device=eng.device.type,
        page_size=P,
        device_kv_bytes=layout.page_nbytes,
        host_kv_bytes=(n + 8) * layout.page_nbytes,
        host_codec="none",
        write_back=False,
    )
    # restore always beats recompute here: the paths are compared, not the decision
    cost = CostModel(prefill_tokens_per_s=1.0, tiers={"host": TierCost(1e12)})
    cache = KVCache(layout, eng.fingerprint, config, cost)
    try:
        first = cache.lookup(tokens[:prefix_tokens], "bench")
        cache.commit(first, tokens[:prefix_tokens], lambda a, m: pages[a : a + m])
        cache.release(first)
        found = cache.lookup(tokens, "bench")
        tiers = [t for t, _ in found.sources]
        out: dict[str, Any] = dict(
            device_pages=tiers.count("device"), host_pages=tiers.count("host"), pages=n
        )
        restore_s: list[float] = []
        logits: dict[str, torch.Tensor] = {}

        def turn(layered: bool) -> None:
            t0 = time.perf_counter()
            restored = cache.restore(found, eng.device, eng.dtype, layered=layered)
            restore_s.append(time.perf_counter() - t0)
            past = restored.prefix
            assert isinstance(past, HostKVPrefix) == (layered and eng.device.type == "cuda")
            logits["layered" if layered else "up_front"] = eng.prefill(tokens, past).logits

        for name, layered in (("up_front", False), ("layered", True)):
            turn(layered)  # warm: compiles, first pinned reads
            restore_s.clear()
            out[f"{name}_ttft_s"] = wall(functools.partial(turn, layered), reps)
            out[f"{name}_restore_call_s"] = sorted(restore_s)[len(restore_s) // 2]
        diff = (logits["layered"].float() - logits["up_front"].float()).abs().max()
        out["logits_max_diff"] = float(diff)
        cache.release(found)
        return out
    finally:
        cache.close()
