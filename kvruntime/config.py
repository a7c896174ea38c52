"""RuntimeConfig: the one config of the runtime layer (names of DESIGN.md's public API)."""

from __future__ import annotations

from dataclasses import dataclass

from kvruntime.errors import ConfigError

MiB = 1 << 20


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    page_size: int = 16  # tokens per page
    device_kv_bytes: int = 256 * MiB  # device page pool budget
    host_kv_bytes: int = 1024 * MiB  # host tier budget (0 disables the tier)
    redis_url: str | None = None  # None: no Redis tier
    host_codec: str = "none"
    redis_codec: str = "int8"
    reuse: bool = True  # False recomputes everything (the baseline)
    dtype: str | None = None  # KV/model dtype; None keeps the model's
    # the deployment secret that keys each tenant's salt (kvcache.tenant_salt), mixed into
    # its page hashes: keep it secret, and unchanged across restarts to reuse Redis pages
    tenant_salt: bytes = b""
    redis_namespace: str = "kvr"
    redis_ttl_s: float | None = None
    # Index entries whose only copy is in Redis (~0.5 KiB each): beyond this many, the least
    # recently used are forgotten (Redis keeps the values; a lookup's probe finds them by
    # hash). Bounds the index: device pages + host slots + this.
    max_redis_index_pages: int = 100_000
    eviction_policy: str = "lru"
    max_queue: int = 64  # turns waiting for the engine before Overloaded is raised
    max_sessions: int = 10_000  # named sessions remembered (least recently used are dropped)
    # Cost model: None measures at start; a number fixes it (tokens/s, bytes/s, seconds).
    prefill_tokens_per_s: float | None = None
    host_bytes_per_s: float | None = None
    redis_bytes_per_s: float | None = None
    redis_latency_s: float = 0.0005
    min_redis_hit_tokens: int = 0  # skip Redis unless it restores at least this many tokens
    write_back: bool = True  # copy new pages to host/Redis in the background
    # encoded pages waiting to be sent to Redis; a write-back that would pass this is not sent
    # (its pages stay in the device/host tiers; tier_usage()["redis"]["writes_skipped"])
    redis_write_backlog_bytes: int = 1024 * MiB

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"RuntimeConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(
                f"RuntimeConfig.page_size must be a power of two, got {self.page_size}"
            )
        if self.device_kv_bytes <= 0:
            raise ConfigError("RuntimeConfig.device_kv_bytes must be positive")
        if self.host_kv_bytes < 0:
            raise ConfigError("RuntimeConfig.host_kv_bytes must be >= 0")
        if self.max_queue <= 0:
            raise ConfigError("RuntimeConfig.max_queue must be positive")
        if self.max_sessions <= 0:
            raise ConfigError("RuntimeConfig.max_sessions must be positive")
        if type(self.max_redis_index_pages) is not int or self.max_redis_index_pages <= 0:
            raise ConfigError(
                "RuntimeConfig.max_redis_index_pages must be a positive int, got"
                f" {self.max_redis_index_pages!r}"
            )
        if self.redis_write_backlog_bytes <= 0:
            raise ConfigError(
                "RuntimeConfig.redis_write_backlog_bytes must be positive, got"
                f" {self.redis_write_backlog_bytes}"
            )
        if self.redis_ttl_s is not None and self.redis_ttl_s <= 0:
            raise ConfigError("RuntimeConfig.redis_ttl_s must be positive or None")
        for name in ("prefill_tokens_per_s", "host_bytes_per_s", "redis_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"RuntimeConfig.{name} must be positive or None")

    @property
    def has_host_tier(self) -> bool:
        return self.host_kv_bytes > 0

    @property
    def has_redis_tier(self) -> bool:
        return self.redis_url is not None
