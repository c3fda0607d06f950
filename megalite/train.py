"""Train a GPT with megalite from Megatron-LM-style flags: the ``megalite-train`` command.

    megalite-train --mock-data --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 64 --micro-batch-size 4 --global-batch-size 8 --train-iters 50
    torchrun --nproc-per-node 8 -m megalite.train --tensor-model-parallel-size 2 ...
    python -m torch.distributed.run --nproc-per-node 8 examples/pretrain_gpt.py ...   # Megatron's habit

Bad input (a flag value, a missing or corrupt dataset, a vocabulary that does not parse, batch
sizes that do not divide) is reported as one line, ``<program>: error: ...``, with exit status 2,
where <program> is the name the user typed (``megalite-train``, ``python -m megalite.train`` or
``pretrain_gpt.py``).  Anything else is a bug and keeps its traceback.

Under a launcher, one rank's fault is said by that rank, ``... error: [rank 3] ...``, and also
appended to the file named by MEGALITE_ERROR_FILE (a bug as ``[rank 3] <Type>: <message>``), before
the rank leaves the process group: its peers, blocked in a collective, fail only once it has gone,
so the file's first line is the cause.  examples/train_gpt2_torchrun.sh prints that line last.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

PROG = "megalite-train"


def print_help(prog: str) -> None:
    # The flag parser names itself after Megatron's script; --help should show the command typed.
    from megalite.training.arguments import build_parser

    parser = build_parser()
    parser.prog = prog
    parser.print_help()


def error_line(prog: str, message: str) -> Optional[str]:
    """``<prog>: error: [rank N] <message>``.  Before the ranks meet, every rank fails alike and rank 0
    speaks (None elsewhere); after, a fault may be one rank's own (a file only it reads)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return f"{prog}: error: [rank {dist.get_rank()}] {message}"
    return f"{prog}: error: {message}" if int(os.environ.get("RANK", "0")) == 0 else None


def record(line: Optional[str]) -> None:
    """Append the line to MEGALITE_ERROR_FILE when the launcher set it (one short write: ranks on a
    node share the file, and O_APPEND keeps their lines whole)."""
    path = os.environ.get("MEGALITE_ERROR_FILE")
    if line is not None and path:
        with open(path, "a") as f:
            f.write(line + "\n")


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def report(prog: str, error: BaseException) -> None:
    """Bad input: one line on stderr, and recorded."""
    line = error_line(prog, first_line(error))
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    record(line)


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    from megalite.checkpoint.manifest import CheckpointError
    from megalite.parallel.launch import shut_down_distributed
    from megalite.training.loop import SETUP_ERRORS, TrainingDiverged, setup, train

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
    except Exception as error:
        # A bug (or a peer's fault felt as a lost connection): the traceback follows; the record
        # names it in one line.
        record(error_line(prog, f"{type(error).__name__}: {first_line(error)}"))
        raise
    finally:
        shut_down_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.train"))
