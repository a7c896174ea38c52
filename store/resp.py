"""A minimal RESP2 client for the bulk path: one socket, pipelined commands, replies read
straight into caller buffers, and a small bounded pool per server.

Why not redis-py for bulk data: every redis-py read path materialises a value as Python
``bytes`` (and hiredis copies again), which caps retrieval well below what a socket
delivers. Here a bulk reply's header is parsed from a small read buffer and its body is
``recv_into``'d directly into the destination (bytearray, numpy array, pinned tensor memory);
writes go out with ``sendmsg`` over the caller's buffers, never concatenated.

Every socket operation has a timeout and every call has an absolute deadline
(``time.monotonic()`` seconds). Any I/O error marks the connection broken and closes it: a
socket with unread replies is never reused.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from kvruntime.errors import StoreUnavailable
from kvruntime.store.retry import RetryGate

_CRLF = b"\r\n"
_SMALL = 16 * 1024  # parts below this are joined before sendmsg: a copy beats an iovec entry
_MAX_IOV = 512  # below IOV_MAX (1024) on Linux
_READ_BUFFER = 256 * 1024


class Address(NamedTuple):
    host: str
    port: int
    path: str | None = None  # unix socket path; host and port unused when set

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ConnectOptions:
    connect_timeout_s: float = 1.0
    op_timeout_s: float = 2.0  # longest wait for any single send/recv
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None  # TLS name to verify; defaults to the address host
    socket_buffer_bytes: int | None = None  # SO_SNDBUF/SO_RCVBUF; None keeps autotuning


class RespError(StoreUnavailable):
    """A connection-level failure. ``kind`` is one of: connect, tls, auth, timeout, deadline,
    closed, protocol, pool, down."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class ReplyError(NamedTuple):
    """An error reply (``-ERR ...``, ``-OOM ...``, ``-MOVED ...``): data, not an exception,
    because in a pipeline it belongs to one command and the connection stays usable."""

    message: str

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


class Lease(NamedTuple):
    conn: RespConnection
    reused: bool  # came from the idle list (it may have gone stale since)


class Oversize(NamedTuple):
    """A bulk value larger than its destination buffer; it was read and discarded."""

    size: int


Reply: TypeAlias = int | bytes | str | ReplyError | list["Reply"] | None


def pack_command(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def pack_around(
    head: Sequence[bytes], value_len: int, tail: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """The bytes before and after a large value argument, so the value itself is sent from
    the caller's buffer: ``head args, value, tail args``."""
    before = [b"*%d\r\n" % (len(head) + 1 + len(tail))]
    before += [b"$%d\r\n%s\r\n" % (len(a), a) for a in head]
    before.append(b"$%d\r\n" % value_len)
    after = [_CRLF] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in tail]
    return b"".join(before), b"".join(after)


def byte_view(buffer: object, *, writable: bool) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (bytes, bytearray, memoryview,
    numpy array, ...). Raises TypeError/ValueError for non-contiguous or read-only input."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)  # type: ignore[arg-type]
    if writable and view.readonly:
        raise ValueError("destination buffer is read-only")
    if not view.contiguous:
        raise ValueError("buffer must be contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class RespConnection:
    """One RESP2 socket. Not thread-safe: a pool lends it to one thread at a time."""

    def __init__(self, sock: socket.socket, address: Address, options: ConnectOptions) -> None:
        self.address = address
        self.broken = False
        self._sock = sock
        self._op_timeout = options.op_timeout_s
        self._timeout: float | None = None
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._tls = isinstance(sock, ssl.SSLSocket)

    @classmethod
    def open(cls, address: Address, options: ConnectOptions, deadline: float) -> RespConnection:
        """Dial, TLS-handshake, AUTH and SELECT; raises RespError (connect/tls/auth/timeout)."""
        left = min(options.connect_timeout_s, deadline - time.monotonic())
        if left <= 0:
            raise RespError("deadline", f"no time left to connect to {address}")
        try:
            if address.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(left)
                sock.connect(address.path)
            else:
                sock = socket.create_connection((address.host, address.port), timeout=left)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if options.socket_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.socket_buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.socket_buffer_bytes)
        except OSError as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
            raise RespError(kind, f"{address}: {exc}") from None
        if options.ssl_context is not None:
            try:
                name = options.server_hostname or address.host
                sock = options.ssl_context.wrap_socket(sock, server_hostname=name)
            except OSError as exc:  # SSLError, CertificateError, a handshake timeout
                sock.close()
                raise RespError("tls", f"{address}: TLS handshake failed: {exc}") from None
        conn = cls(sock, address, options)
        conn._handshake(options, deadline)
        return conn

    def _handshake(self, options: ConnectOptions, deadline: float) -> None:
        cmds = []
        if options.password is not None:
            user = [options.username] if options.username else []
            cmds.append(pack_command("AUTH", *user, options.password))
        if options.db:
            cmds.append(pack_command("SELECT", options.db))
        if not cmds:
            return
        self.send(cmds, deadline)
        for _ in cmds:
            reply = self.read_reply(deadline)
            if isinstance(reply, ReplyError):
                self.close()
                raise RespError("auth", f"{self.address}: {reply.message}")

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- I/O primitives -------------------------------------------------------------------
    def _fail(self, kind: str, message: str) -> RespError:
        self.close()
        return RespError(kind, f"{self.address}: {message}")

    def _arm(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._fail("deadline", "batch deadline passed")
        timeout = self._op_timeout if self._op_timeout < left else left
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def _io_error(self, exc: OSError) -> RespError:
        if isinstance(exc, TimeoutError):
            kind = "timeout" if self._timeout == self._op_timeout else "deadline"
            return self._fail(kind, f"no progress within {self._timeout:.3f}s")
        return self._fail("tls" if isinstance(exc, ssl.SSLError) else "closed", str(exc))

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        if self.broken:
            raise RespError("closed", f"{self.address}: connection already failed")
        self._arm(deadline)
        try:
            n = self._sock.recv_into(view)
        except OSError as exc:
            raise self._io_error(exc) from None
        if n == 0:
            raise self._fail("closed", "server closed the connection")
        return n

    def send(self, parts: Sequence[bytes | memoryview], deadline: float) -> None:
        """Write all parts in order; small ones are joined, large ones go out as they are."""
        if self.broken:
            raise RespError("closed", f"{self.address}: connection already failed")
        views: list[memoryview] = []
        small: list[bytes | memoryview] = []
        for part in parts:
            if len(part) < _SMALL:
                small.append(part)
                continue
            if small:
                views.append(memoryview(b"".join(small)))
                small = []
            views.append(part if isinstance(part, memoryview) else memoryview(part))
        if small:
            views.append(memoryview(b"".join(small)))
        i = 0
        try:
            while i < len(views):
                self._arm(deadline)
                if self._tls:  # SSLSocket has no sendmsg
                    sent = self._sock.send(views[i])
                else:
                    sent = self._sock.sendmsg(views[i : i + _MAX_IOV])
                while sent:
                    if sent >= len(views[i]):
                        sent -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0
        except OSError as exc:
            raise self._io_error(exc) from None

    def _fill(self, deadline: float) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                raise self._fail("protocol", "reply line longer than the read buffer")
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start : self._end]
            self._start, self._end = 0, rest
        self._end += self._recv_into(self._view[self._end :], deadline)

    def _line(self, deadline: float) -> bytes:
        while True:
            at = self._buf.find(_CRLF, self._start, self._end)
            if at >= 0:
                line = bytes(self._buf[self._start : at])
                self._start = at + 2
                return line
            self._fill(deadline)

    def _take_into(self, dest: memoryview, deadline: float) -> None:
        """Fill ``dest`` completely: first from buffered bytes, then straight off the socket."""
        size = len(dest)
        have = min(self._end - self._start, size)
        if have:
            dest[:have] = self._view[self._start : self._start + have]
            self._start += have
        while have < size:
            have += self._recv_into(dest[have:], deadline)

    def _skip(self, size: int, deadline: float) -> None:
        while size:
            if self._start == self._end:
                self._fill(deadline)
            step = min(size, self._end - self._start)
            self._start += step
            size -= step

    def _crlf(self, deadline: float) -> None:
        while self._end - self._start < 2:
            self._fill(deadline)
        if self._buf[self._start : self._start + 2] != _CRLF:
            raise self._fail("protocol", "bulk reply not terminated by CRLF")
        self._start += 2

    # -- replies --------------------------------------------------------------------------
    def _header(self, deadline: float) -> tuple[int, bytes]:
        line = self._line(deadline)
        if not line:
            raise self._fail("protocol", "empty reply line")
        return line[0], line[1:]

    def read_reply(self, deadline: float) -> Reply:
        """Read one whole reply of any type (control-plane and small values)."""
        kind, rest = self._header(deadline)
        try:
            if kind == 0x2B:  # +
                return rest.decode()
            if kind == 0x2D:  # -
                return ReplyError(rest.decode(errors="replace"))
            if kind == 0x3A:  # :
                return int(rest)
            if kind == 0x24:  # $
                size = int(rest)
                if size < 0:
                    return None
                body = bytearray(size)
                self._take_into(memoryview(body), deadline)
                self._crlf(deadline)
                return bytes(body)
            if kind == 0x2A:  # *
                count = int(rest)
                return None if count < 0 else [self.read_reply(deadline) for _ in range(count)]
        except ValueError:
            pass
        raise self._fail("protocol", f"unexpected reply {bytes([kind]) + rest[:40]!r}")

    def read_bulk_into(
        self, dest: memoryview, deadline: float
    ) -> int | ReplyError | Oversize | None:
        """Read one bulk-string reply into ``dest[:size]``; returns the size, None for a nil
        reply, the ReplyError, or Oversize (body discarded, ``dest`` left untouched)."""
        kind, rest = self._header(deadline)
        if kind == 0x2D:
            return ReplyError(rest.decode(errors="replace"))
        try:
            size = int(rest) if kind == 0x24 else None
        except ValueError:
            size = None
        if size is None:
            raise self._fail(
                "protocol", f"expected a bulk reply, got {bytes([kind]) + rest[:40]!r}"
            )
        if size < 0:
            return None
        if size > len(dest):
            self._skip(size + 2, deadline)
            return Oversize(size)
        self._take_into(dest[:size], deadline)
        self._crlf(deadline)
        return size


class ConnectionPool:
    """At most ``size`` connections to one server, created on demand. Thread-safe.

    ``acquire`` hands out an idle connection or dials a new one; while ``gate`` says the
    server failed recently, it raises RespError("down") instead of dialling, so a dead server
    costs nothing until the backoff passes. ``release`` keeps healthy connections and closes
    broken ones. ``failed`` records a server-level failure and drops the idle connections.
    """

    def __init__(self, address: Address, options: ConnectOptions, size: int, gate: RetryGate):
        self.address = address
        self.options = options
        self.size = size
        self.gate = gate
        self._idle: list[RespConnection] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, deadline: float) -> Lease:
        """An idle connection or a new one; raises RespError (pool, down, connect, ...)."""
        with self._cond:
            while not self._idle and self._busy >= self.size:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise RespError("pool", f"{self.address}: no free connection before deadline")
                self._cond.wait(left)
            if self._closed:
                raise RespError("closed", f"{self.address}: pool closed")
            self._busy += 1
            if self._idle:
                return Lease(self._idle.pop(), True)
        try:
            if not self.gate.ready():
                wait = self.gate.retry_in()
                raise RespError("down", f"{self.address}: failing, next attempt in {wait:.2f}s")
            conn = RespConnection.open(self.address, self.options, deadline)
        except RespError as exc:
            if exc.kind != "down":
                self.gate.failure()
            self._give_back(None)
            raise
        self.gate.success()
        return Lease(conn, False)

    def release(self, conn: RespConnection) -> None:
        self._give_back(None if conn.broken else conn)
        if conn.broken:
            conn.close()

    def _give_back(self, conn: RespConnection | None) -> None:
        with self._cond:
            self._busy -= 1
            if conn is not None:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)
            self._cond.notify()

    def failed(self) -> None:
        self.gate.failure()
        self._drop_idle()

    def _drop_idle(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._drop_idle()
