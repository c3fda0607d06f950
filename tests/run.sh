#!/usr/bin/env bash
# Set up (venv, dependencies, extensions), lint, and run the whole test suite with the doctests of
# megalite/ (pyproject.toml's testpaths).  Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check . || { echo "[tests] ruff check failed: fix the lines above (ruff check --fix sorts imports)" >&2; exit 1; }
else
  echo "[tests] ruff is not installed here (offline machine?): lint skipped"
fi
start=$(date +%s)
"$PY" -m pytest -q "$@"
echo "[tests] suite wall time: $(( $(date +%s) - start )) s"
