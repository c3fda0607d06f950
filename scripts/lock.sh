#!/usr/bin/env bash
# Refresh requirements/cpu.txt, the lock that scripts/setup_env.sh installs on CPU machines: the
# exact versions, transitive ones included, of pyproject.toml's build requirements, dependencies and
# every extra the suite uses, with torch pinned by requirements/cpu-torch.txt.  pip-compile (pip-tools)
# runs in a scratch environment, so nothing of the project's own environment changes.
#
#     bash scripts/lock.sh            # then: bash tests/run.sh, and commit the lock if it passes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="data,plot,hf,tensorboard,wandb,dev"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip pip-tools 2>&1 \
  | { grep -v "is ignored" || true; }
cd "$ROOT"
"$scratch/venv/bin/pip-compile" -q --allow-unsafe --strip-extras --all-build-deps --no-emit-index-url \
  --no-emit-find-links --extra "$EXTRAS" -c requirements/cpu-torch.txt -o requirements/cpu.txt pyproject.toml \
  2>&1 | { grep -v "is ignored" || true; }
echo "[lock] requirements/cpu.txt: $(grep -c '^[A-Za-z]' requirements/cpu.txt) packages pinned for Python" \
  "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
