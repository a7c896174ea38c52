#!/usr/bin/env bash
# ruff and mypy over the whole project. mypy cannot follow setuptools' package-dir mapping,
# so it checks a link tree (.typecheck/kvruntime/{radix,kernels,store} -> the real folders).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv/bin"
"$venv/ruff" check .
"$venv/ruff" format --check . >/dev/null || { "$venv/ruff" format --diff . | head -50; exit 1; }
tree="$root/.typecheck"
rm -rf "$tree" && mkdir -p "$tree/kvruntime"
for f in kvruntime/*; do ln -s "$root/$f" "$tree/kvruntime/$(basename "$f")"; done
for d in radix kernels store; do ln -s "$root/$d" "$tree/kvruntime/$d"; done
(cd "$tree" && "$venv/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" -p kvruntime)
"$venv/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
  --explicit-package-bases $(ls -d tests benchmarks examples 2>/dev/null | while read -r d; do ls "$d"/*.py >/dev/null 2>&1 && echo "$d"; done)
