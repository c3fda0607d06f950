#!/usr/bin/env bash
# Set up (venv, dependencies, extensions) and run the whole test suite.  Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
start=$(date +%s)
"$PY" -m pytest -q tests "$@"
echo "[tests] suite wall time: $(( $(date +%s) - start )) s"
