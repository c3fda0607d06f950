#!/usr/bin/env bash
# GPT-2 small (124M) on one or more machines with torchrun.  Run the same command on every node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/train_gpt2_torchrun.sh     # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/train_gpt2_torchrun.sh     # on node1
#
# Data: DATA_PATH is a .bin/.idx prefix (or a Megatron blend "0.3 a 0.7 b") tokenized with GPT-2's
# vocabulary (tools/preprocess_data.py); without it the run uses --mock-data.  The GPT-2 vocabulary
# files come from tools/fetch_gpt2_vocab.py.  Any extra arguments are appended to the flags below
# and win over them (argparse keeps the last value), e.g. `... -- --train-iters 100`.
# Layout knobs: TP, PP, VPP (virtual stages per rank; empty = none); DP is what is left.
# CPU machines work too (gloo): NPROC_PER_NODE sets the ranks per node (default: GPUs, else 2).
# The run resumes from its newest checkpoint when started again (--load = --save), and SIGTERM to
# the training processes (a scheduler's preemption notice) saves at the end of the iteration and
# exits 0 (--exit-signal-handler).  MAX_RESTARTS=N lets torchrun restart the ranks up to N times
# when one dies (they resume from the newest checkpoint).  When ranks fail, the first one's error
# line, `[rank N] ...`, is printed again as the last line (after torchrun's summary), and the script
# exits non-zero.  TRAIN_SCRIPT replaces examples/pretrain_gpt.py as the program torchrun starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
TP="${TP:-1}"
PP="${PP:-1}"
VPP="${VPP:-}"
OUT="${OUT:-runs/gpt2-small}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-examples/pretrain_gpt.py}"

if [ -n "${DATA_PATH:-}" ]; then
  [ -s .cache/gpt2/encoder.json ] || "$PY" tools/fetch_gpt2_vocab.py
  # shellcheck disable=SC2206  # a blend is several words on purpose
  DATA_FLAGS=(--data-path $DATA_PATH --split 969,30,1 --tokenizer-type GPT2BPETokenizer
              --vocab-file .cache/gpt2/encoder.json --merge-file .cache/gpt2/vocab.bpe)
else
  DATA_FLAGS=(--mock-data --vocab-size 50257)
fi
PARALLEL_FLAGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
[ "$TP" -gt 1 ] && PARALLEL_FLAGS+=(--sequence-parallel)
[ -n "$VPP" ] && PARALLEL_FLAGS+=(--virtual-pipeline-model-parallel-size "$VPP")
PRECISION_FLAGS=()
[ "$GPUS" -gt 0 ] && PRECISION_FLAGS=(--bf16 --use-distributed-optimizer --overlap-grad-reduce)

# GPT-2 small as in the GPT-2 and Megatron-LM papers' settings: 12 x 768, 12 heads, 1024 context.
MODEL_FLAGS=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024
             --max-position-embeddings 1024 --hidden-dropout 0.1 --attention-dropout 0.1)
TRAIN_FLAGS=(--micro-batch-size 4 --global-batch-size 256 --train-iters 20000
             --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 700 --lr-decay-style cosine
             --weight-decay 0.1 --clip-grad 1.0 --seed 1234
             --log-interval 10 --eval-interval 1000 --eval-iters 20
             --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 1000
             --log-json "$OUT/log.jsonl" --exit-signal-handler)

RDZV_FLAGS=(--max-restarts "$MAX_RESTARTS" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")

mkdir -p "$OUT"
# Every rank that fails appends its one error line here; the first is the cause (the others mostly
# lost their peer), and it is printed again last, below torchrun's own summary.
export MEGALITE_ERROR_FILE="$OUT/errors.node$NODE_RANK.txt"
: > "$MEGALITE_ERROR_FILE"
# torchrun in the background so that this script outlives it: a SIGTERM or SIGINT sent to the script
# goes on to torchrun, which passes it to the training processes.
"$PY" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" "${RDZV_FLAGS[@]}" \
    "$TRAIN_SCRIPT" "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" "${DATA_FLAGS[@]}" \
    "${PARALLEL_FLAGS[@]}" ${PRECISION_FLAGS[@]+"${PRECISION_FLAGS[@]}"} "$@" &
TORCHRUN=$!
trap 'kill -TERM "$TORCHRUN" 2>/dev/null' TERM
trap 'kill -INT "$TORCHRUN" 2>/dev/null' INT
status=0
# wait returns early (>128) when a trapped signal arrives; wait again until torchrun has ended.
while true; do
  wait "$TORCHRUN" && status=0 || status=$?
  kill -0 "$TORCHRUN" 2>/dev/null || break
done
if [ "$status" -ne 0 ] && [ -s "$MEGALITE_ERROR_FILE" ]; then
  head -n 1 "$MEGALITE_ERROR_FILE" >&2
fi
exit "$status"
