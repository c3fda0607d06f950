"""Train a GPT with megalite from Megatron-LM-style flags: the ``megalite-train`` command.

    megalite-train --mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 64 --micro-batch-size 4 --global-batch-size 8 --train-iters 50
    torchrun --nproc-per-node 8 -m megalite.train --tensor-model-parallel-size 2 ...
    python -m torch.distributed.run --nproc-per-node 8 examples/pretrain_gpt.py ...   # Megatron's habit

Bad input (a flag value, a missing or corrupt dataset, a vocabulary that does not parse, batch
sizes that do not divide) is reported as one line, ``<program>: error: ...``, with exit status 2,
where <program> is the name the user typed (``megalite-train``, ``python -m megalite.train`` or
``pretrain_gpt.py``).  Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

PROG = "megalite-train"


def print_help(prog: str) -> None:
    # The flag parser names itself after Megatron's script; --help should show the command typed.
    from megalite.arguments import build_parser

    parser = build_parser()
    parser.prog = prog
    parser.print_help()


def report(prog: str, error: BaseException) -> None:
    """One line on stderr.  Before the ranks meet, every rank fails alike and rank 0 speaks; after,
    a fault may be one rank's own (a file only it reads), so each rank says it with its rank."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if dist.is_initialized() and dist.get_world_size() > 1:
        print(f"{prog}: error: [rank {dist.get_rank()}] {message}", file=sys.stderr, flush=True)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    from megalite.checkpoint_manifest import CheckpointError
    from megalite.parallel import state
    from megalite.training import SETUP_ERRORS, TrainingDiverged, setup, train

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(prog)
        return 0
    try:
        try:
            run = setup(argv)
        except SETUP_ERRORS as error:
            report(prog, error)
            return 2
        try:
            train(run)
        except (TrainingDiverged, CheckpointError) as error:
            report(prog, error)
            return 2
    finally:
        state.destroy_grid()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.train"))
