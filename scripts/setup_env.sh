# Sourced by examples/quickstart.sh and tests/run.sh: creates or reuses a virtual environment,
# installs megalite's dependencies (those pyproject.toml lists, with the extras in $MEGALITE_EXTRAS)
# and builds its extensions.  Safe to re-run: each step is skipped when already done.  Leaves $PY
# pointing at the environment's python.
#
# CPU machines get torch==2.13.0 (its CPU wheel lies on disk; an unpinned torch would pull a
# multi-GB CUDA build).  A machine whose python3 already has torch (the GPU machines, which have
# no network) gets a venv with --system-site-packages that reuses that torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGALITE_VENV:-$ROOT/.venv}"
TORCH_PIN="torch==2.13.0"

say() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    say "python3 already has torch $(python3 -c 'import torch; print(torch.__version__)'): reusing it"
    python3 -m venv --system-site-packages "$VENV"
  else
    say "creating $VENV"
    python3 -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
export PY

pip_quiet() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  say "installing $TORCH_PIN (CPU)"
  pip_quiet "$TORCH_PIN"
fi

# Everything else comes from pyproject.toml, the one list of dependencies: the build requirements,
# the runtime dependencies and the extras in $MEGALITE_EXTRAS.  Only what is missing is installed
# (GPU machines have torch and more preinstalled and no network), pip may never replace the installed
# torch (a constraint pins it), and a failed install is a line here, never a failure: what needs a
# missing package fails or skips later and names it.
EXTRAS="${MEGALITE_EXTRAS-data,plot,hf,tensorboard,wandb,dev}"
missing_requirements() {
  "$PY" "$ROOT/scripts/missing_requirements.py" "$ROOT/pyproject.toml" "$EXTRAS" \
    || say "could not read the requirements of pyproject.toml (above); installing none" >&2
}
need=()
missing=$(missing_requirements)
[ -z "$missing" ] || mapfile -t need <<< "$missing"
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  keep_torch="$VENV/.megalite-keep-torch.txt"
  "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
  pip_quiet --retries 1 --timeout 30 -c "$keep_torch" "${need[@]}"
  still=$(missing_requirements)
  [ -z "$still" ] || say "not installed (offline?): $(echo $still); what needs them fails or skips, naming them"
fi

# Optional: only benchmarks and the tests that skip without them use these.  One short try (no
# network on the GPU machines: pip fails in seconds), and a miss is a line here, never a failure.
# transformers: the peer of benchmarks/train_throughput.py (~18 MB of wheels, ~140 MB installed, ~30 s beside torch).
optional=()
for mod in transformers; do   # each is its pip name too
  "$PY" -c "import $mod" >/dev/null 2>&1 || optional+=("$mod")
done
if [ ${#optional[@]} -gt 0 ]; then
  say "installing optional ${optional[*]}"
  pip_quiet --retries 1 --timeout 15 "${optional[@]}"
  for req in "${optional[@]}"; do
    "$PY" -c "import $req" >/dev/null 2>&1 || say "optional $req is not installed (offline?): what needs it skips"
  done
fi

# Rebuild the extensions only when their sources or the build files changed.
stamp="$VENV/.megalite-build-stamp"
digest=$(cd "$ROOT" && cat setup.py pyproject.toml $(find csrc -type f | sort) 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$PY" -c "import megalite" >/dev/null 2>&1; then
  say "building megalite (C++ extensions; ~1-2 minutes on 2 cores)"
  start=$(date +%s)
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --disable-pip-version-check -q \
      --no-build-isolation --no-deps -e . 2>&1 | grep -v -E "^WARNING: Location|is ignored" || true)
  "$PY" -c "import megalite" || { echo "[setup] megalite failed to install" >&2; exit 1; }
  echo "$digest" > "$stamp"
  say "built in $(( $(date +%s) - start )) s"
fi

# GPT-2's vocabulary files (used by the tokenizer tests); a miss only skips those tests.
"$PY" "$ROOT/tools/fetch_gpt2_vocab.py" --quiet || say "could not fetch GPT-2 vocabulary files; GPT-2 BPE tests will skip"
