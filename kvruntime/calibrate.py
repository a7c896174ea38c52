"""Quick measurements at start for the cost model: prefill speed and host-tier decode rate.
Values given in RuntimeConfig are used instead of measuring."""

from __future__ import annotations

import logging
import time

import torch

from kvruntime.config import RuntimeConfig
from kvruntime.cost import CostModel, TierCost
from kvruntime.engines.base import Engine
from kvruntime.kernels.layout import PageLayout
from kvruntime.store.codec import get_codec

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 64
DEFAULT_REDIS_BYTES_PER_S = 1.0e9  # loopback Redis with the buffer-reading client, measured


def measure_prefill(engine: Engine, tokens: int = CALIBRATION_TOKENS) -> float:
    """Prompt tokens per second of a short prefill (after one warm-up)."""
    ids = [(i * 31) % 97 + 3 for i in range(tokens)]  # valid in any vocabulary of 100+
    engine.prefill(ids[:8])
    t0 = time.perf_counter()
    engine.prefill(ids)
    return tokens / max(time.perf_counter() - t0, 1e-9)


def measure_host(
    layout: PageLayout, codec_name: str, device: torch.device, pages: int = 4
) -> float:
    """Bytes per second of decoding host blocks into device pages (copy included)."""
    codec = get_codec(codec_name)
    # [pages, L, 2, H, P, D] random KV in the layout's dtype
    x = torch.randn((pages, *layout.page_shape)).to(layout.dtype)
    blocks = codec.encode(x)
    out = torch.empty_like(x, device=device)
    codec.decode(blocks.to(device), layout, out)
    t0 = time.perf_counter()
    codec.decode(blocks.to(device), layout, out)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return blocks.numel() / max(time.perf_counter() - t0, 1e-9)


def calibrate(engine: Engine, layout: PageLayout, config: RuntimeConfig) -> CostModel:
    prefill = config.prefill_tokens_per_s or measure_prefill(engine)
    host = config.host_bytes_per_s or measure_host(layout, config.host_codec, engine.device)
    redis = config.redis_bytes_per_s or DEFAULT_REDIS_BYTES_PER_S
    log.info("cost model: prefill %.0f tok/s, host %.2f GB/s", prefill, host / 1e9)
    return CostModel(
        prefill_tokens_per_s=prefill,
        tiers={
            "host": TierCost(host),
            "redis": TierCost(redis, latency_s=config.redis_latency_s),
        },
    )
