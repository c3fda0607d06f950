#!/usr/bin/env python
"""Train a GPT with megalite from Megatron-LM-style flags (Megatron's script name for ``megalite-train``).

    python examples/pretrain_gpt.py --mock-data --num-layers 2 --hidden-size 64 \\
        --num-attention-heads 4 --seq-length 64 --micro-batch-size 4 --global-batch-size 8 --train-iters 50
    python -m torch.distributed.run --nproc-per-node 8 examples/pretrain_gpt.py \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 ...

The trainer is megalite/train.py (installed as ``megalite-train``); errors here read
``pretrain_gpt.py: error: ...``.  Needs megalite installed (``pip install --no-build-isolation -e .``).
"""
import sys

from megalite.train import main

if __name__ == "__main__":
    sys.exit(main(prog="pretrain_gpt.py"))
