# Sourced by examples/quickstart.sh and tests/run.sh: creates or reuses a virtual environment,
# installs megalite's dependencies at the versions of the lock requirements/cpu.txt (made from
# pyproject.toml by scripts/lock.sh) and builds its extensions.  Safe to re-run: each step is
# skipped when already done.  Leaves $PY pointing at the environment's python.
#
# CPU machines get exactly the lock, torch==2.13.0's CPU build included (its wheel lies on disk); a
# pin that cannot be installed ends the set-up with one line naming it.  A machine whose python3
# already has torch (the GPU machines, which have no network) gets a venv with
# --system-site-packages that keeps that torch and what is installed beside it, installs the rest of
# the lock where it can, and prints what differs from the lock.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGALITE_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements/cpu.txt"

say() { echo "[setup] $*"; }

reuse_system_torch=0
# A venv that cannot run pip (a half-made one), or that was made to reuse a torch it cannot see (a
# python3 that is itself a venv hands its base interpreter's packages on), is made again.
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  say "$VENV has no working pip: making it again"; rm -rf "$VENV"
fi
if [ -x "$VENV/bin/python" ] && grep -q "^include-system-site-packages = true" "$VENV/pyvenv.cfg" 2>/dev/null \
    && ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  say "$VENV was made to reuse python3's torch but cannot import it: making it again"; rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    say "python3 already has torch $(python3 -c 'import torch; print(torch.__version__)'): reusing it"
    python3 -m venv --system-site-packages "$VENV"
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
      echo "[setup] python3 ($(command -v python3)) has torch, but a venv made from it does not see it (is" \
           "python3 itself a venv?); run with the python that owns torch first on PATH, or set MEGALITE_VENV" \
           "to a venv that has torch" >&2
      rm -rf "$VENV"
      exit 1
    fi
  else
    say "creating $VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
    || { echo "[setup] $VENV has no pip (install python3-venv / ensurepip), made again next time" >&2; rm -rf "$VENV"; exit 1; }
fi
PY="$VENV/bin/python"
export PY
grep -q "^include-system-site-packages = true" "$VENV/pyvenv.cfg" 2>/dev/null && reuse_system_torch=1

PIP_LOG="$VENV/.megalite-pip.log"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" > "$PIP_LOG" 2>&1; }
# The first pin pip could not find, from its log; else its last error line.
pip_failure() {
  local pin
  pin=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' "$PIP_LOG" | head -1)
  [ -n "$pin" ] && echo "$pin" || grep -E "^ERROR" "$PIP_LOG" | tail -1
}
lock_status() { "$PY" "$ROOT/scripts/lock_status.py" "$LOCK" "$@"; }

if [ "$reuse_system_torch" = "0" ]; then
  need=$(lock_status)
  if [ -n "$need" ]; then
    say "installing $(echo "$need" | wc -l) packages from requirements/cpu.txt"
    if ! pip_install --retries 1 --timeout 30 --no-deps -r "$LOCK"; then
      echo "[setup] cannot install $(pip_failure) from requirements/cpu.txt (no network, or no wheel for" \
           "Python $("$PY" -c 'import platform; print(platform.python_version())') here): connect to the package" \
           "index, or re-lock for this Python with 'bash scripts/lock.sh' (pip's log: $PIP_LOG)" >&2
      exit 1
    fi
  fi
else
  # Keep the preinstalled torch; try the rest of the lock once (these machines are usually offline).
  need=$(lock_status --skip torch)
  if [ -n "$need" ]; then
    keep_torch="$VENV/.megalite-keep-torch.txt"
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
    pip_install --retries 0 --timeout 10 -c "$keep_torch" $need \
      || say "could not install the lock's versions here (offline?): $(pip_failure); keeping what is installed"
  fi
fi
differ=$(lock_status --explain)
if [ -z "$differ" ]; then
  say "installed versions equal requirements/cpu.txt ($(grep -c '^[A-Za-z]' "$LOCK") packages)"
else
  say "installed versions that differ from requirements/cpu.txt:"
  echo "$differ" | sed 's/^/[setup]   /'
fi

# Rebuild the extensions only when their sources or the build files changed.
stamp="$VENV/.megalite-build-stamp"
digest=$(cd "$ROOT" && cat setup.py pyproject.toml $(find csrc -type f | sort) 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$PY" -c "import megalite" >/dev/null 2>&1; then
  say "building megalite (C++ extensions; ~1-2 minutes on 2 cores)"
  start=$(date +%s)
  if ! (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --disable-pip-version-check -q \
      --no-build-isolation --no-deps -e . 2>&1 | { grep -v -E "^WARNING: Location|is ignored" || true; }); then
    echo "[setup] building megalite failed (the compiler's messages are above); fix them and run again" >&2
    exit 1
  fi
  "$PY" -c "import megalite" || { echo "[setup] megalite failed to install" >&2; exit 1; }
  echo "$digest" > "$stamp"
  say "built in $(( $(date +%s) - start )) s"
fi

# GPT-2's vocabulary files (used by the tokenizer tests); a miss only skips those tests.
"$PY" "$ROOT/tools/fetch_gpt2_vocab.py" --quiet || say "could not fetch GPT-2 vocabulary files; GPT-2 BPE tests will skip"
