"""kvruntime.store: page codecs and the wire format, the device page pool, the host tier and
the Redis tier. Transport (``redis``, ``resp``) only moves bytes; tiers (``host``,
``redis_tier``) own capacity and failure policy; ``codec`` and ``wire`` own the bytes."""

from __future__ import annotations
