"""The planner's own flags: what a published run used that megalite-train does not run.

Megatron-LM's runs set flags whose effect is on time or memory alone (communication overlapped with
compute, the pipeline split that counts the embedding and the loss as layers, FP8 GEMMs).  megalite-train
does not implement most of them; the planner accepts them, with Megatron's spelling, so a published command
line can be predicted as it ran.  They travel in the same argv as the trainer's flags: ``split_plan_flags``
takes them out and the rest goes to ``parse_args``.  The two that megalite-train also reads
(``--overlap-param-gather``, ``--data-parallel-sharding-strategy``) go to both.

    --tp-comm-overlap                         TP collectives split and overlapped with the GEMMs
                                              (needs --sequence-parallel, as in Megatron)
    --overlap-param-gather                    the sharded parameters' all-gather overlapped with the
                                              next step's forward (needs a sharded optimizer and
                                              --overlap-grad-reduce)
    --no-overlap-p2p-communication            pipeline messages block the stage (the default with the
                                              interleaved schedule posts them beside the next pass)
    --account-for-embedding-in-pipeline-split the embedding counts as one layer in the pipeline split
    --account-for-loss-in-pipeline-split      the output layer and loss count as one layer
    --fp8-format {e4m3,hybrid}                the linear layers' GEMMs in FP8 (hardware.py's fp8 peak)
    --data-parallel-sharding-strategy {no_shard,optim,optim_grads,optim_grads_params}
                                              ZeRO-1/2/3 over DP x CP (memory.py; communication.py)

What each changes is stated where it is modelled (predict.py, memory.py, docs/scaling.md).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["PlanOptions", "split_plan_flags", "SHARDING_STRATEGIES", "FP8_FORMATS"]

SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
FP8_FORMATS = ("e4m3", "hybrid")


@dataclass(frozen=True)
class PlanOptions:
    tp_comm_overlap: bool = False
    overlap_param_gather: bool = False
    overlap_p2p_comm: bool = True          # with the interleaved schedule, as Megatron's default
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    fp8_format: Optional[str] = None
    data_parallel_sharding_strategy: Optional[str] = None     # None: ZeRO-1 iff --use-distributed-optimizer

    def sharding(self, trainer_strategy: str) -> str:
        """The run's sharding strategy: the flag's, else the trainer's reading of its flags
        (``OptimizerConfig.sharding_strategy``: ``--use-distributed-optimizer``, ``--use-megatron-fsdp``, ...)."""
        if self.data_parallel_sharding_strategy is not None:
            return self.data_parallel_sharding_strategy
        return trainer_strategy


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(add_help=False, allow_abbrev=False)
    for name in ("--tp-comm-overlap", "--overlap-param-gather", "--account-for-embedding-in-pipeline-split",
                 "--account-for-loss-in-pipeline-split"):
        parser.add_argument(name, action="store_true")
    parser.add_argument("--no-overlap-p2p-communication", action="store_false", dest="overlap_p2p_comm")
    parser.add_argument("--fp8-format", choices=FP8_FORMATS, default=None)
    parser.add_argument("--data-parallel-sharding-strategy", choices=SHARDING_STRATEGIES, default=None)
    return parser


# Flags megalite-train reads too (docs/sharded_data_parallel.md): they stay in the trainer's argv as well.
SHARED_WITH_TRAINER = ("--overlap-param-gather", "--data-parallel-sharding-strategy")


def split_plan_flags(argv: Sequence[str]) -> Tuple[PlanOptions, List[str]]:
    """(the planner's own flags, the trainer's flags) of ``argv``; a bad value is one ValueError line."""
    argv = list(argv)
    known, rest = _parser().parse_known_args(argv)
    shared = []
    for index, arg in enumerate(argv):
        if arg.split("=", 1)[0] in SHARED_WITH_TRAINER:
            takes_value = arg == "--data-parallel-sharding-strategy" and index + 1 < len(argv)
            shared += [arg] + ([argv[index + 1]] if takes_value else [])
    return PlanOptions(**vars(known)), rest + shared
