"""Published large-scale runs the performance model is checked against, as megalite flags.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC21, arXiv 2104.04473), Table 1: weak scaling on Selene (DGX A100 80GB nodes, 8 GPUs
and 8 x 200 Gb/s HDR InfiniBand each), GPT with sequence length 2048 and vocabulary 51,200, mixed
precision, full activation recompute, the interleaved schedule.  Throughput counts the FLOPs of
their Eq. 3 (recompute included) and every operation of the step (data loading, optimizer, logging).
The aggregate of the last row, 163 x 3072 = 502 PFLOP/s, is the figure the paper's abstract quotes.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv 2205.05198), Table 3: four GPT configurations trained with sequence parallelism and selective
recompute (same sequence length and vocabulary), with their model and hardware FLOPs utilization,
measured with a data-parallel size of one (GPUs = TP x PP), as Megatron-LM's README reported them.

Transcribed from the papers; of the figures, the 1T row's 56.3% MFU / 57.0% HFU and Table 1's
502 PFLOP/s aggregate were cross-checked against a second source (Megatron-LM's README, the paper's
abstract), the others were not.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

__all__ = ["NarayananRow", "NARAYANAN_TABLE_1", "KorthikantiRow", "KORTHIKANTI_TABLE_3", "SEQ_LENGTH", "VOCAB_SIZE",
           "model_flags", "narayanan_flags", "korthikanti_flags", "PAPER_PLANNER_FLAGS"]

SEQ_LENGTH = 2048
VOCAB_SIZE = 51200


class NarayananRow(NamedTuple):
    params_billion: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops_per_gpu: float       # achieved, Eq. 3 FLOPs
    percent_of_peak: float      # of 312 TFLOP/s


# params (B), heads, hidden, layers, TP, PP, GPUs, batch, TFLOP/s per GPU, % of peak
NARAYANAN_TABLE_1: List[NarayananRow] = [NarayananRow(*row) for row in [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
]]


class KorthikantiRow(NamedTuple):
    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    micro_batch: int
    mfu_percent: float          # with sequence parallelism and selective recompute
    hfu_percent: float


KORTHIKANTI_TABLE_3: List[KorthikantiRow] = [KorthikantiRow(*row) for row in [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 41.5, 43.7),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 51.4, 52.8),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 56.0, 57.0),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 56.3, 57.0),
]]


def model_flags(heads: int, hidden: int, layers: int, tp: int, pp: int, batch: int,
                micro_batch: Optional[int] = None) -> List[str]:
    """megalite-train flags of a published GPT configuration (fp16 as in both papers, no data)."""
    flags = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
             "--seq-length", str(SEQ_LENGTH), "--max-position-embeddings", str(SEQ_LENGTH),
             "--vocab-size", str(VOCAB_SIZE), "--make-vocab-size-divisible-by", "128",
             "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--global-batch-size", str(batch), "--fp16",
             # both papers' attention materialized the scores (their activation counts rest on it)
             "--attention-backend", "unfused"]
    if micro_batch is not None:
        flags += ["--micro-batch-size", str(micro_batch)]
    return flags


# The planner's own flags (options.py) for both papers: their pipeline messages blocked the stage (the
# overlapped exchange came to Megatron-LM later).  Kept apart: the flags above also launch megalite-train.
PAPER_PLANNER_FLAGS = ["--no-overlap-p2p-communication"]


def narayanan_flags(row: NarayananRow) -> List[str]:
    """As the paper ran it: full recompute, the interleaved schedule where there is a pipeline."""
    flags = model_flags(row.heads, row.hidden, row.layers, row.tp, row.pp, row.batch)
    flags += ["--recompute-granularity", "full", "--recompute-method", "uniform"]
    if row.pp > 1:
        flags += ["--pipeline-schedule", "interleaved"]
    return flags


def korthikanti_flags(row: KorthikantiRow) -> List[str]:
    """As the paper ran it: sequence parallelism and selective recompute."""
    flags = model_flags(row.heads, row.hidden, row.layers, row.tp, row.pp, row.batch, row.micro_batch)
    return flags + ["--sequence-parallel", "--recompute-granularity", "selective"]
