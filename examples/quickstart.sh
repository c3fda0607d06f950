#!/usr/bin/env bash
# megalite quickstart: set up, tokenize the Python standard library, train a small GPT on CPU,
# print the falling loss and a sample of generated text, and draw the loss curve.
#
#   bash examples/quickstart.sh
#
# Everything lands in runs/quickstart/ (gitignored).  Safe to re-run: the corpus, tokenizer and
# tokenized data are reused when present; training starts afresh each time.
# By default it trains on 8 CPU ranks in the full 3D layout -- TP=2 x PP=2 x DP=2 with sequence
# parallelism, the interleaved pipeline schedule (2 virtual stages per rank) and the ZeRO-1
# distributed optimizer -- launched by torchrun on gloo; the loss equals a one-rank run's.
# Knobs (environment): ITERS (training iterations), NPROC (ranks; 1 trains on one process),
# PARALLEL_FLAGS (the layout flags; default: the 3D layout above when NPROC=8, none otherwise).
# Context parallelism splits each 128-token sequence over ranks too, e.g. on 8 ranks:
#   PARALLEL_FLAGS="--tensor-model-parallel-size 2 --context-parallel-size 2 --sequence-parallel" \
#   bash examples/quickstart.sh        (TP=2 x CP=2 x DP=2; the loss still equals one rank's)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start=$(date +%s)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"

OUT=runs/quickstart
ITERS="${ITERS:-200}"
NPROC="${NPROC:-8}"
if [ "$NPROC" = 8 ]; then
  DEFAULT_LAYOUT="--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel
    --virtual-pipeline-model-parallel-size 2 --use-distributed-optimizer"
else
  DEFAULT_LAYOUT=""
fi
PARALLEL_FLAGS="${PARALLEL_FLAGS:-$DEFAULT_LAYOUT}"
VOCAB_SIZE=4096
mkdir -p "$OUT"
say() { echo "[quickstart] $*"; }

# 1. Corpus: the standard library's own sources (every machine with Python has them), one
#    document per .py file.  Left out: tests, vendored trees, pydoc_data (the manual as one generated
#    dict of strings), generated tables of hex/escape literals (--skip-tables: the encodings/cp*.py
#    charmaps, html/entities.py, stringprep.py; 1.4 MB of 11 MB, which otherwise fill the samples with
#    '\x..' lines) and files with a line over 200 characters (data, not code).
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
EXCLUDE=(test tests idlelib lib2to3 site-packages dist-packages __pycache__ ensurepip pydoc_data)
CORPUS_FLAGS=(--input "$STDLIB" --pattern "*.py" --exclude "${EXCLUDE[@]}" --skip-tables --max-line-length 200)
say "corpus: the *.py files under $STDLIB"
# The tokenizer and data below are reused only when made from this very corpus selection.
CORPUS_KEY="$(printf '%s\n' "${CORPUS_FLAGS[@]}" "vocab $VOCAB_SIZE")"
if [ "$(cat "$OUT/corpus.key" 2>/dev/null)" != "$CORPUS_KEY" ]; then
  rm -rf "$OUT/tokenizer" "$OUT/data"
fi

# 2. A byte-level BPE tokenizer trained on that corpus (GPT-2 file format: vocab.json + merges.txt).
TOK="$OUT/tokenizer"
if [ ! -s "$TOK/merges.txt" ]; then
  say "training a byte-level BPE tokenizer (vocabulary $VOCAB_SIZE)"
  "$VENV/bin/megalite-train-tokenizer" "${CORPUS_FLAGS[@]}" --vocab-size "$VOCAB_SIZE" --output-dir "$TOK"
else
  say "tokenizer: reusing $TOK"
fi
TOKENIZER_FLAGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt")

# 3. Tokenized, Megatron-compatible .bin/.idx.
DATA="$OUT/data/stdlib"
if [ ! -s "$DATA.idx" ]; then
  say "tokenizing the corpus into $DATA.{bin,idx}"
  mkdir -p "$OUT/data"
  "$VENV/bin/megalite-preprocess" "${CORPUS_FLAGS[@]}" --output-prefix "$DATA" --append-eod --workers 2 --quiet \
      "${TOKENIZER_FLAGS[@]}"
else
  say "data: reusing $DATA.{bin,idx}"
fi

echo "$CORPUS_KEY" > "$OUT/corpus.key"

# 4. Train.  A small GPT: 4 layers, hidden 128, 128-token context.
rm -rf "$OUT/checkpoints" "$OUT/log.jsonl"
TRAIN_FLAGS=(
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128
  --micro-batch-size 2 --global-batch-size 16 --train-iters "$ITERS"
  --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
  --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234
  --data-path "$DATA" --split 98,2,0 "${TOKENIZER_FLAGS[@]}"
  --log-interval 20 --eval-interval 100 --eval-iters 4
  --save "$OUT/checkpoints" --log-json "$OUT/log.jsonl" --timeline "$OUT/pipeline_timeline.png"
)
say "training for $ITERS iterations on $NPROC rank(s) "$PARALLEL_FLAGS
if [ "$NPROC" -gt 1 ]; then
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node "$NPROC" \
      -m megalite.train "${TRAIN_FLAGS[@]}" $PARALLEL_FLAGS
else
  "$VENV/bin/megalite-train" "${TRAIN_FLAGS[@]}" $PARALLEL_FLAGS
fi

# 5. What it learned: the loss, a sample, the curve.
"$PY" - "$OUT/log.jsonl" <<'PYEOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
first = sum(r["loss"] for r in records[:10]) / min(10, len(records))
last = sum(r["loss"] for r in records[-10:]) / min(10, len(records))
print(f"[quickstart] loss: first 10 iterations {first:.3f} -> last 10 iterations {last:.3f} "
      f"(fell by {first - last:.3f} nats/token)")
PYEOF
say "a sample from the trained model (prompt 'def '):"
"$VENV/bin/megalite-generate" --load "$OUT/checkpoints" --prompt "def " --max-new-tokens 120 --temperature 0.7
PNG=$("$PY" examples/plot_loss.py "$OUT/log.jsonl" "$OUT/loss.png" --title "megalite quickstart: GPT on the Python stdlib")
say "loss curve: $ROOT/$PNG"
say "done in $(( $(date +%s) - start )) s"
