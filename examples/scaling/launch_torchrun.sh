#!/usr/bin/env bash
# One node's share of a published run (examples/scaling/runs.py --list): the planner's prediction
# first, then megalite-train with the same flags and the micro-batch / virtual pipeline sizes the
# planner chose.  Run on every node (examples/scaling/launch_slurm.sh does it under SLURM):
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/scaling/launch_torchrun.sh narayanan-1.7b
#
# GPU (default a100-80gb) is the planner's preset; DATA_PATH a GPT-2-tokenized .bin/.idx prefix
# (default --mock-data); TRAIN_ITERS (default 10: a throughput run, as the papers' benchmarks were);
# DRY_RUN=1 prints the training command instead of running it.  Extra arguments go to both commands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
RUN="${1:?give a run name: python examples/scaling/runs.py --list}"
shift

SPEC=$("$PY" examples/scaling/runs.py "$RUN")
GPUS=${SPEC%%$'\n'*}; GPUS=${GPUS#GPUS=}
eval "FLAGS=(${SPEC#*$'\n'})"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-$(( (GPUS + NPROC_PER_NODE - 1) / NPROC_PER_NODE ))}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

# The prediction (every node computes the same one; node 0 prints the table).
PLAN=$("$PY" -m megalite.plan --world-size "$GPUS" --gpu "${GPU:-a100-80gb}" \
       --gpus-per-node "$NPROC_PER_NODE" "${FLAGS[@]}" "$@" --json)
[ "$NODE_RANK" = 0 ] && printf '%s\n' "$PLAN"
CHOSEN=$(printf '%s\n' "$PLAN" | tail -n 1 | "$PY" -c 'import json, sys
p = json.loads(sys.stdin.read())
flags = ["--micro-batch-size", str(p["micro_batch_size"])]
if p["virtual_pipeline_model_parallel_size"]:
    flags += ["--virtual-pipeline-model-parallel-size", str(p["virtual_pipeline_model_parallel_size"])]
print(" ".join(flags))')

if [ -n "${DATA_PATH:-}" ]; then
  [ -s .cache/gpt2/encoder.json ] || "$PY" tools/fetch_gpt2_vocab.py
  # shellcheck disable=SC2206  # a blend is several words on purpose
  DATA_FLAGS=(--data-path $DATA_PATH --tokenizer-type GPT2BPETokenizer
              --vocab-file .cache/gpt2/encoder.json --merge-file .cache/gpt2/vocab.bpe)
else
  DATA_FLAGS=(--mock-data)
fi
# shellcheck disable=SC2206  # CHOSEN is flag words
COMMAND=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES"
         --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         -m megalite.train "${FLAGS[@]}" $CHOSEN "${DATA_FLAGS[@]}" --train-iters "${TRAIN_ITERS:-10}"
         --lr 1e-4 --log-interval 1 --log-throughput --eval-iters 0 "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${COMMAND[@]}"; echo
else
  exec "${COMMAND[@]}"
fi
