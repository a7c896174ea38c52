"""Redis Cluster connector: routes each key to the master of its slot, one pipeline per node.

A key's slot is CRC16(key) mod 16384, hashing only the part inside the first ``{...}`` when
present. The slot map comes from CLUSTER SLOTS on first use and again after MOVED replies or
connection failures (throttled); a batch is grouped by node, each node's share is pipelined
on its own thread, MOVED/ASK redirects are followed a few times (the rounds are run by
``RedisConnector``; this class routes and learns from redirects).
"""

from __future__ import annotations

import binascii
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kvruntime.store.redis import SERVER_DOWN, Job, RedisConnector
from kvruntime.store.redis_url import RedisURL
from kvruntime.store.resp import Address, ConnectOptions, ReplyError, RespError, pack_command
from kvruntime.store.retry import Backoff

T = TypeVar("T")
SLOTS = 16384


def key_slot(key: bytes) -> int:
    """Redis Cluster slot: CRC16-XMODEM (= binascii.crc_hqx from 0) of the hash tag or key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


class RedisClusterConnector(RedisConnector):
    """Redis Cluster: routes each key to its slot's master, one pipeline per node."""

    refresh_interval_s = 0.5  # at most one slot-map refresh per interval (injected clock)

    def __init__(
        self,
        url: RedisURL,
        options: ConnectOptions,
        pool_size: int = 4,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(url, options, pool_size, backoff, clock)
        self._slots: list[Address | None] | None = None
        self._stale = True
        self._refreshed_at = float("-inf")
        self._refresh_error = RespError("route", "slot map not loaded yet")
        self._map_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kvr-redis")

    def slot_owner(self, key: bytes) -> Address | None:
        """The node the current slot map sends ``key`` to (None before discovery)."""
        slots = self._slots
        return None if slots is None else slots[key_slot(key)]

    def close(self) -> None:
        super().close()
        self._executor.shutdown(wait=True)

    def _route(
        self, job: Job[T], keys: Sequence[bytes], todo: list[int]
    ) -> dict[Address, list[int]]:
        refresh = self._stale and self.clock() - self._refreshed_at >= self.refresh_interval_s
        if refresh:
            self._refresh(job.deadline)
        slots = self._slots
        groups: dict[Address, list[int]] = {}
        job.asking.clear()
        unrouted = 0
        for i in todo:
            target = job.redirects.get(i)
            if target is not None and target[1]:  # ASK: this key only, to that node
                groups.setdefault(target[0], []).append(i)
                job.asking.setdefault(target[0], set()).add(i)
                continue
            owner = slots[key_slot(keys[i])] if slots is not None else None
            if owner is None:
                unrouted += 1
            else:
                groups.setdefault(owner, []).append(i)
        job.redirects.clear()
        if unrouted:
            self._stale = True
            if slots is None:  # discovery failed (now: why; throttled since: "down")
                err = self._refresh_error
                kind = err.kind if refresh else "down"
                job.fault(kind, "-", unrouted, f"cluster slot discovery: {err.detail}")
            else:
                job.fault("route", "-", unrouted, "no node serves the slot in the slot map")
        return groups

    def _run_groups(self, job: Job[T], groups: dict[Address, list[int]]) -> None:
        asking = job.asking
        items = list(groups.items())
        if len(items) == 1:
            self._run_group(job, items[0][0], items[0][1], asking.get(items[0][0], set()))
            return
        futures = [
            self._executor.submit(self._run_group, job, a, idxs, asking.get(a, set()))
            for a, idxs in items
        ]
        for future in futures:
            future.result()

    def _redirect(self, job: Job[T], i: int, reply: ReplyError, node: str) -> None:
        parts = reply.message.split(" ")
        try:
            slot, host, port = int(parts[1]), *parts[2].rsplit(":", 1)
            target = Address(host or self.url.addresses[0].host, int(port))
        except (IndexError, ValueError):
            job.fault("protocol", node, 1, f"bad redirect {reply.message!r}")
            return
        ask = reply.code == "ASK"
        with job.lock:
            job.redirects[i] = (target, ask)
            if not ask:
                job.moved[slot] = target

    def _after_round(self, job: Job[T]) -> None:
        if job.moved:
            with self._map_lock:
                if self._slots is not None:
                    for slot, owner in job.moved.items():
                        self._slots[slot] = owner
            job.moved.clear()
            self._stale = True
        if any(k in SERVER_DOWN or k == "connect" for k, _ in job.faults):
            self._stale = True  # a failover may have moved slots

    def _refresh(self, deadline: float) -> None:
        with self._map_lock:
            self._refreshed_at = self.clock()
            known = {a for a in (self._slots or ()) if a is not None}
            candidates = list(self.url.addresses) + sorted(known - set(self.url.addresses))
        for address in candidates:
            pool = self._pool(address)
            try:
                conn = pool.acquire(deadline).conn
            except RespError as exc:
                self._refresh_error = exc
                continue
            try:
                conn.send([pack_command(b"CLUSTER", b"SLOTS")], deadline)
                reply = conn.read_reply(deadline)
            except RespError as exc:
                self._refresh_error = exc
                if exc.kind in SERVER_DOWN:
                    pool.failed()
                continue
            finally:
                pool.release(conn)
            slots = self._parse_slots(reply, address)
            if slots is None:
                self._refresh_error = RespError("route", f"{address}: CLUSTER SLOTS: {reply!r:.80}")
                continue
            with self._map_lock:
                self._slots = slots
                self._stale = False
            return

    @staticmethod
    def _parse_slots(reply: object, asked: Address) -> list[Address | None] | None:
        if not isinstance(reply, list):
            return None
        slots: list[Address | None] = [None] * SLOTS
        try:
            for entry in reply:
                start, end, master = entry[0], entry[1], entry[2]
                host = master[0].decode() or asked.host
                owner = Address(host, int(master[1]))
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = owner
        except (TypeError, IndexError, ValueError, AttributeError):
            return None
        return slots
