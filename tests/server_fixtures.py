"""A real ``kvruntime serve`` process for tests: the tiny random-weight model saved with a long
context, a free port, readiness by polling ``/health`` (never a fixed sleep), and a kill at the
end (also at interpreter exit, so a failing test leaves nothing running)."""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from model_fixtures import tiny_model, tiny_tokenizer

CONTEXT = 4096
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(5)


def save_long_tiny(path: Path, context: int = CONTEXT) -> Path:
    """The tiny Llama of model_fixtures with a ``context``-token window (agent prompts here
    run to a few thousand characters, one token each)."""
    model = tiny_model()
    model.config.max_position_embeddings = context
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # type: ignore[attr-defined]
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``kvruntime serve --model MODEL`` (a path or an alias) run in ``workdir``."""

    def __init__(self, model: str, workdir: Path, *args: str, name: str = "tiny") -> None:
        self.port = free_port()
        self.model = model
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "kvruntime.cli", "serve", "--model", model]
        cmd += ["--port", str(self.port), "--served-model-name", name, *args]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env
            )
        _LIVE.add(self.proc)

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(delay)  # polling interval, not a wait for readiness
            delay = min(delay * 1.5, 0.5)
        raise TimeoutError(f"server not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _LIVE.discard(self.proc)


def start_server(tmp: Path, *args: str, model: str | None = None) -> ServerProcess:
    """Serve ``model``, by default the long-context tiny model saved under ``tmp``; ready when
    returned (the first SmolLM2 load on a machine converts its weights, ~25 s)."""
    if model is None:
        server = ServerProcess(str(save_long_tiny(tmp / "model")), tmp, *args)
    else:
        server = ServerProcess(model, tmp, *args, name=model)
    try:
        return server.wait_ready()
    except BaseException:
        server.stop()
        raise
