#!/usr/bin/env bash
# Sets up .venv (quick when already done), then runs ruff, mypy and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_radix_tree.py -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/lint.sh"
cd "$root"
# Tests import the installed package (kvruntime.*), never the bare folders.
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
