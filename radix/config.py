"""The radix index's one config: page size, eviction policy, default namespace."""

from __future__ import annotations

from dataclasses import dataclass

from kvruntime.errors import ConfigError
from kvruntime.radix.hashing import Namespace
from kvruntime.radix.policy import POLICIES


@dataclass(frozen=True)
class RadixConfig:
    """``page_size`` tokens per page; ``eviction`` names a policy in ``POLICIES``;
    ``namespace`` is used by calls that pass none (a tree may hold many namespaces)."""

    page_size: int = 16
    eviction: str = "lru"
    namespace: Namespace | None = None

    def __post_init__(self) -> None:
        if type(self.page_size) is not int or self.page_size <= 0:
            raise ConfigError(
                f"RadixConfig.page_size must be a positive int, got {self.page_size!r}"
            )
        POLICIES.get(self.eviction)  # an unknown name raises UnknownName listing the known
        if self.namespace is not None and not isinstance(self.namespace, Namespace):
            raise ConfigError(f"RadixConfig.namespace must be a Namespace, got {self.namespace!r}")
