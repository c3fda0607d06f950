#!/usr/bin/env python
"""Train a GPT with megalite from Megatron-LM-style flags.

    python examples/pretrain_gpt.py --mock-data --num-layers 2 --hidden-size 64 \\
        --num-attention-heads 4 --seq-length 64 --micro-batch-size 4 --global-batch-size 8 --train-iters 50
    python -m torch.distributed.run --nproc-per-node 8 examples/pretrain_gpt.py \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 ...

Bad input (a flag value, a missing or corrupt dataset, a vocabulary that does not parse, batch
sizes that do not divide) is reported as one line, ``pretrain_gpt.py: error: ...``, with exit
status 2.  Anything else is a bug and keeps its traceback.
"""
import os
import sys

import torch.distributed as dist


def main(argv=None) -> int:
    from megalite.parallel import state
    from megalite.training import SETUP_ERRORS, setup, train

    try:
        run = setup(argv)
    except SETUP_ERRORS as error:
        # Every rank fails the same way; one line from rank 0 is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"pretrain_gpt.py: error: {message}", file=sys.stderr)
        return 2
    try:
        train(run)
    finally:
        state.destroy_grid()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
