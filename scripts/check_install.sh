#!/usr/bin/env bash
# Acceptance test of the install, as a user gets it: a fresh virtual environment, then
#   pip install --no-build-isolation .[data,plot]
# then, from a folder outside the checkout: every console script's --help, and a tiny job --
# megalite-train-tokenizer and megalite-preprocess on a small corpus, megalite-train for a few
# iterations with a checkpoint, megalite-generate from it.
#
#   bash scripts/check_install.sh
#
# The fresh environment sees the packages of .venv (torch and the extras, made by setup_env.sh)
# through a .pth line, as --system-site-packages would over a venv, so nothing is downloaded: pip
# finds every requirement satisfied and builds only megalite.  Takes ~3-4 minutes on 2 cores, most
# of it compiling the C++ extensions again (a wheel is built from scratch), which is why it is a
# script and not part of the test suite (tests/test_packaging.py checks the metadata cheaply).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start=$(date +%s)
source "$ROOT/scripts/setup_env.sh"
say() { echo "[check_install] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/megalite-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ENV="$WORK/env"
"$PY" -m venv "$ENV"
parent_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
env_site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Appended after the environment's own site-packages: what pip installs there comes first.
echo "$parent_site" > "$env_site/megalite-check-parent.pth"

say "pip install --no-build-isolation $ROOT[data,plot] into $ENV"
t0=$(date +%s)
(cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$ENV/bin/python" -m pip install --disable-pip-version-check -q \
    --no-build-isolation ".[data,plot]" 2>&1 | grep -v -E "^WARNING: Location|is ignored|Not uninstalling|Can't uninstall" || true)
say "installed in $(( $(date +%s) - t0 )) s"

ELSEWHERE="$WORK/elsewhere"   # not the checkout: nothing here can shadow the installed package
mkdir -p "$ELSEWHERE"
cd "$ELSEWHERE"
export PATH="$ENV/bin:$PATH" OMP_NUM_THREADS=1
unset PYTHONPATH RANK WORLD_SIZE
where=$("$ENV/bin/python" -c 'import megalite; print(megalite.__file__)')
case "$where" in
  "$ENV"/*) say "megalite imported from $where" ;;
  *) echo "[check_install] megalite was imported from $where, not from the fresh environment $ENV" >&2; exit 1 ;;
esac

for script in megalite-train megalite-preprocess megalite-generate megalite-train-tokenizer megalite-plan; do
  usage=$("$script" --help | head -1)
  case "$usage" in
    "usage: $script "*) say "$script --help: ${usage:0:70}..." ;;
    *) echo "[check_install] $script --help printed '$usage'" >&2; exit 1 ;;
  esac
done

# A tiny job: the json package of the standard library as corpus, a 320-token BPE trained on it.
STDLIB=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
megalite-train-tokenizer --input "$STDLIB/json" --pattern "*.py" --skip-tables --vocab-size 320 --output-dir tok
TOK=(--tokenizer-type GPT2BPETokenizer --vocab-file tok/vocab.json --merge-file tok/merges.txt)
megalite-preprocess --input "$STDLIB/json" --pattern "*.py" --skip-tables --output-prefix data/json \
    --append-eod --quiet "${TOK[@]}"
megalite-train --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 \
    --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 4 --lr 1e-3 \
    --data-path data/json --split 90,10,0 "${TOK[@]}" --log-interval 1 --eval-interval 4 --eval-iters 1 \
    --save ckpt --save-interval 4
megalite-generate --load ckpt --prompt "def " --max-new-tokens 16
megalite-plan --world-size 64 --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \
    --global-batch-size 256 --bf16 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --json | tail -n 1
say "passed in $(( $(date +%s) - start )) s"
