"""A regular (non-editable) install puts everything under the one ``kvruntime`` namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regular_install_has_one_namespace(tmp_path: Path) -> None:
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*cmd, "--target", str(target), str(ROOT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"kvruntime", "bin"}, top  # no bare radix/, kernels/ or store/
    probe = (
        "import kvruntime.radix, kvruntime.kernels, kvruntime.store.wire, kvruntime.engines.chat;"
        "print(kvruntime.radix.__file__)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(target))
