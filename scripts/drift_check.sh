#!/usr/bin/env bash
# The drift check, run by hand and outside CI: install the newest releases of everything the lock
# pins (all but torch, which stays at the CPU machines' requirements/cpu-torch.txt unless
# DRIFT_TORCH=1, which takes the newest torch pip offers: on these machines a multi-GB CUDA build)
# into a scratch environment, run the whole suite there, and print which versions
# moved past the lock and how the suite ended.  A breaking release is seen here before a new machine
# meets it; when the suite passes, `bash scripts/lock.sh` moves the lock forward.
#
#     bash scripts/drift_check.sh [pytest arguments]      # ~10 minutes on 2 cores; writes drift_check_out/
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/drift_check_out"
ENV="$(mktemp -d "${TMPDIR:-/tmp}/megalite-drift.XXXXXX")"
trap 'rm -rf "$ENV"' EXIT
mkdir -p "$OUT"
say() { echo "[drift] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

python3 -m venv "$ENV/venv"
PY="$ENV/venv/bin/python"
"$PY" -m pip install --disable-pip-version-check -q --upgrade pip > "$OUT/pip.log" 2>&1 \
  || { say "FAILED: pip could not upgrade itself (offline?): see $OUT/pip.log"; exit 1; }
names=$(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' "$ROOT/requirements/cpu.txt" | grep -v -x torch)
torch_spec=$([ "${DRIFT_TORCH:-0}" = "1" ] && echo torch || grep -v '^#' "$ROOT/requirements/cpu-torch.txt")
say "installing the newest releases of $(echo "$names" | wc -w) packages, and $torch_spec"
# shellcheck disable=SC2086
if ! "$PY" -m pip install --disable-pip-version-check -q --upgrade "$torch_spec" $names >> "$OUT/pip.log" 2>&1; then
  say "FAILED: the newest releases do not install together: $(grep -E '^ERROR' "$OUT/pip.log" | tail -1)"
  exit 1
fi
say "newer than requirements/cpu.txt:"
"$PY" "$ROOT/scripts/lock_status.py" "$ROOT/requirements/cpu.txt" --explain | sed 's/^/[drift]   /' \
  | tee -a "$OUT/summary.txt"
# A copy of the working tree (tracked and new files), so that this build leaves the checkout's own
# compiled extensions alone; the GPT-2 vocabulary files come along where the checkout has them.
mkdir "$ENV/src"
(cd "$ROOT" && git ls-files -co --exclude-standard | while IFS= read -r f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -cf - -T -) | tar -xf - -C "$ENV/src"
(cd "$ENV/src" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e . >> "$OUT/pip.log" 2>&1) || { say "FAILED: megalite did not build"; exit 1; }
[ -d "$ROOT/.cache/gpt2" ] && mkdir -p "$ENV/src/.cache" && cp -r "$ROOT/.cache/gpt2" "$ENV/src/.cache/"
start=$(date +%s)
(cd "$ENV/src" && "$PY" -m pytest -q -p no:cacheprovider "$@") > "$OUT/tests.log" 2>&1
status=$?
say "suite: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -1) in $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | sed 's/^/[drift]   /' | tee -a "$OUT/summary.txt"
exit $status
