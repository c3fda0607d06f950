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

from typing import List, NamedTuple, Optional, Tuple

__all__ = ["NarayananRow", "NARAYANAN_TABLE_1", "KorthikantiRow", "KORTHIKANTI_TABLE_3", "SEQ_LENGTH", "VOCAB_SIZE",
           "model_flags", "narayanan_flags", "korthikanti_flags", "PAPER_PLANNER_FLAGS", "PublishedRun", "later_runs"]

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


# ---------------------------------------------------------------------------------------------------
# Runs published after both papers, on H100s (and OPT-175B's FSDP layout on A100s), each as it ran.

class PublishedRun(NamedTuple):
    name: str
    source: str                 # where the figure was read
    gpu: str                    # the hardware preset
    gpus: int
    flags: Tuple[str, ...]      # megalite-train flags plus the planner's own (options.py), as published
    tflops_per_gpu: float       # the published figure, in ``convention``
    convention: str             # "megatron": model FLOPs of Megatron-LM's num_floating_point_operations
                                # (= flops.py); "eq3": Narayanan et al.'s Eq. 3, recompute included;
                                # "palm": PaLM's MFU count, 6N + 12LHQT (flops.palm_flops_per_iteration)
    note: str = ""              # what the source leaves open and how the row fills it


MEGATRON_README = ("NVIDIA/Megatron-LM README, images/model_table.png (commit f2e5db4, 2024-07-15, "
                   "Megatron-Core r0.8.0), per-GPU teraFLOP/s column; counted by that commit's "
                   "megatron/training/training.py num_floating_point_operations: full s^2 attention, the logits, "
                   "GQA and SwiGLU's 3/2 (= flops.py); its MFU column is the same figure over 989")
MEGATRON_STRONG = ("NVIDIA/Megatron-LM README, 'Strong Scaling Results' text: 177B from 96 to 4,608 H100s at "
                   "batch 1,152, MFU 47% -> 42% (of 989 TFLOP/s), text of commit f2e5db4 (the table's count)")
LLAMA3 = ("Dubey et al. 2024, 'The Llama 3 Herd of Models', Table 4 (TFLOPs/GPU) and Sec. 3.3.2, whose MFU "
          "is 'MFU; Chowdhery et al. (2023)': PaLM's Appendix B count, 6N + 12LHQT, dense attention")
OPT = "Zhang et al. 2022, 'OPT: Open Pre-trained Transformer Language Models', Sec. 2.4 (147 TFLOP/s per GPU)"

# Megatron-LM's H100 GPT benchmark (README): seq 4,096, vocabulary 131,072, untied embeddings (the
# parameter column is 12 L h^2 + 2 V h: 177.2B for h 12,288 x 96 layers), DP 48 in every row, with
# --overlap-grad-reduce --overlap-param-gather (distributed optimizer) --tp-comm-overlap and the
# interleaved schedule's overlapped messages, as the README lists.  Not published: micro-batch and
# virtual pipeline sizes (the planner chooses them, as for Narayanan's table), dropout (Megatron's
# default 0.1 kept), sequence parallelism (on wherever TP > 1: --tp-comm-overlap needs it).
# (params B, heads, hidden, layers, TP, PP, GPUs, batch, per-GPU TFLOP/s)
MEGATRON_H100_WEAK = [
    (1.7, 16, 2048, 24, 1, 1, 48, 192, 408.8), (7.1, 32, 4096, 30, 2, 1, 96, 192, 465.9),
    (16, 48, 6144, 32, 4, 1, 192, 192, 489.1), (32, 56, 7168, 48, 8, 1, 384, 192, 459.6),
    (70, 64, 8192, 84, 8, 2, 768, 384, 419.7), (119, 80, 10240, 92, 8, 4, 1536, 768, 420.5),
    (177, 96, 12288, 96, 8, 6, 2304, 1152, 432.8), (314, 128, 16384, 96, 8, 8, 3072, 1536, 474.4),
    (462, 144, 18432, 112, 8, 16, 6144, 3072, 459.9),
]


def _megatron_h100_flags(heads: int, hidden: int, layers: int, tp: int, pp: int, batch: int) -> Tuple[str, ...]:
    flags = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
             "--seq-length", "4096", "--max-position-embeddings", "4096", "--vocab-size", "131072",
             "--untie-embeddings-and-output-weights", "--bf16", "--tensor-model-parallel-size", str(tp),
             "--pipeline-model-parallel-size", str(pp), "--global-batch-size", str(batch),
             "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    return tuple(flags + (["--sequence-parallel", "--tp-comm-overlap"] if tp > 1 else []))


# Llama 3 405B: 126 layers, h 16,384, FFN 53,248, 128 heads, 8 KV heads, vocabulary 128,256, RoPE,
# RMSNorm, SwiGLU, no biases, no dropout, bf16; 16M tokens a step; TP 8, PP 16, CP 1 or 16 (Table 4).
# The first and last stages hold one layer fewer (the embedding and the loss count as layers), with
# an interleaved schedule (Sec. 3.3.2); its FSDP keeps the parameters gathered between forward and
# backward (no re-shard), so the traffic and memory are ZeRO-2's (optim_grads).  Not published:
# micro-batch (1 assumed), virtual size (the planner chooses), TP overlap (off), the attention kernel
# (FlashAttention-2 assumed, --attention-backend flash: Meta's stack is PyTorch, whose fused attention on an
# H100 was FlashAttention-2 until torch 2.5 added cuDNN's in October 2024, after the paper; chosen after the
# 128K row missed at 1.24 with cuDNN's rate, so tools/planner_ablation.py prints both).  FLOP convention: Sec. 3.3.2
# gives its MFU as PaLM's (Chowdhery et al.), whose Appendix B counts 6N + 12LHQT FLOPs a token -- every
# parameter, and the attention over the full sequence (no causal discount); Table 4's MFU column is the
# TFLOP/s column over 989 (43%, 41%, 38% beside 430, 400, 380: the figures are rounded).
_LLAMA3_405B = ("--num-layers", "126", "--hidden-size", "16384", "--ffn-hidden-size", "53248",
                "--num-attention-heads", "128", "--group-query-attention", "--num-query-groups", "8",
                "--vocab-size", "128256", "--make-vocab-size-divisible-by", "128", "--swiglu",
                "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
                "--attention-dropout", "0", "--bf16", "--tensor-model-parallel-size", "8",
                "--pipeline-model-parallel-size", "16", "--sequence-parallel", "--micro-batch-size", "1",
                "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
                "--pipeline-schedule", "interleaved", "--data-parallel-sharding-strategy", "optim_grads",
                "--overlap-grad-reduce", "--attention-backend", "flash")


def _llama3(seq: int, cp: int, batch: int) -> Tuple[str, ...]:
    # Sec. 3.3.2: context parallelism all-gathers K and V, then attends with the local queries ("the all-gather
    # communication latency is exposed in the critical path").
    cp_flags = ("--context-parallel-size", str(cp)) + (("--cp-comm-type", "all_gather") if cp > 1 else ())
    return _LLAMA3_405B + ("--seq-length", str(seq), "--max-position-embeddings", str(seq),
                           "--global-batch-size", str(batch)) + cp_flags


# OPT-175B: 96 layers, h 12,288, 96 heads, GPT-2's vocabulary (50,272), sequence 2,048, fp16, FSDP
# (ZeRO-3) with Megatron TP 8 on 992 A100 80GB, ~2M tokens a step (992 sequences: 8 per DP rank).
# Not published: micro-batch (the planner chooses), recompute (full assumed), FLOP convention (Megatron's).
_OPT_175B = ("--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
             "--max-position-embeddings", "2048", "--vocab-size", "50272", "--fp16", "--tensor-model-parallel-size",
             "8", "--global-batch-size", "992", "--recompute-granularity", "full", "--recompute-method", "uniform",
             "--attention-backend", "unfused", "--data-parallel-sharding-strategy", "optim_grads_params",
             "--overlap-grad-reduce")


MEGATRON_MOE = ("NVIDIA/Megatron-LM, megatron/core/transformer/moe/README.md: '468 TFLOPS for Mixtral 8X7B bf16 "
                "training' (MCore v0.9, the opening paragraph); the layout from its 'Reference Best Parallel Mapping' "
                "table (MCore v0.8, 8 x H100 80GB per node, 8 x 400 Gbit/s InfiniBand); the figure from commit "
                "c230e0d (2024-11-21), counted by num_floating_point_operations as it stood then: full s^2 attention, "
                "the k experts' MLP, the logits (= flops.py)")

# Mixtral 8x7B, dropless, as the MoE README's table and its example script run it: 32 layers, h 4,096, 32 heads,
# 8 query groups, SwiGLU experts of width 14,336 (8 of them, top-2, aux loss 1e-2), RMSNorm, RoPE, untied,
# no biases, no dropout, vocabulary 32K, sequence 4,096, bf16, 64 GPUs: TP 1, EP 8, PP 4, virtual size 8,
# micro-batch 1, batch 256, the alltoall dispatcher, grouped GEMM, the distributed optimizer with overlapped
# gradient reduction and parameter gather.  FLOP count: the 468 came with commit c230e0d (2024-11-21, MCore
# v0.9), when num_floating_point_operations charged the full s^2 attention and the k experts' MLP (= flops.py);
# the causal halving came later (commit 8873b55, 2025-03-06).  Not published beside the figure: that the run
# used exactly this v0.8 mapping; --moe-permute-fusion has no megalite counterpart (the permutation is priced
# at the memory bandwidth, experts.py).
_MIXTRAL_8X7B = ("--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
                 "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
                 "--seq-length", "4096", "--max-position-embeddings", "32768", "--vocab-size", "32000",
                 "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                 "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--hidden-dropout", "0",
                 "--attention-dropout", "0", "--bf16", "--num-experts", "8", "--expert-model-parallel-size", "8",
                 "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm",
                 "--moe-token-dispatcher-type", "alltoall", "--pipeline-model-parallel-size", "4",
                 "--virtual-pipeline-model-parallel-size", "8", "--micro-batch-size", "1", "--global-batch-size",
                 "256", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")


def later_runs() -> List[PublishedRun]:
    """The H100-era runs (OPT-175B and Mixtral 8x7B among them), each with its source and exact configuration."""
    runs = [PublishedRun(f"Megatron H100 {p:g}B", MEGATRON_README, "h100-sxm", gpus,
                         _megatron_h100_flags(a, h, layers, tp, pp, batch), tflops, "megatron")
            for p, a, h, layers, tp, pp, gpus, batch, tflops in MEGATRON_H100_WEAK]
    strong = "layout TP 8 x PP 6 (the 2,304-GPU row's) assumed at both ends; figure = MFU x 989"
    runs += [PublishedRun("Megatron H100 177B strong, 96 GPUs", MEGATRON_STRONG, "h100-sxm", 96,
                          _megatron_h100_flags(96, 12288, 96, 8, 6, 1152), 0.47 * 989, "megatron", strong),
             PublishedRun("Megatron H100 177B strong, 4608 GPUs", MEGATRON_STRONG, "h100-sxm", 4608,
                          _megatron_h100_flags(96, 12288, 96, 8, 6, 1152), 0.42 * 989, "megatron", strong)]
    runs += [PublishedRun("Llama 3 405B 8K, 8192 GPUs", LLAMA3, "h100-sxm", 8192, _llama3(8192, 1, 2048), 430,
                          "palm", "DP 64"),
             PublishedRun("Llama 3 405B 8K, 16384 GPUs", LLAMA3, "h100-sxm", 16384, _llama3(8192, 1, 2048), 400,
                          "palm", "DP 128"),
             PublishedRun("Llama 3 405B 128K, CP 16", LLAMA3, "h100-sxm", 16384, _llama3(131072, 16, 128), 380,
                          "palm", "DP 8")]
    runs.append(PublishedRun("OPT-175B FSDP", OPT, "a100-80gb", 992, _OPT_175B, 147, "megatron"))
    runs.append(PublishedRun("Mixtral 8x7B, 64 GPUs", MEGATRON_MOE, "h100-sxm", 64, _MIXTRAL_8X7B, 468, "megatron",
                             "DP 16, EP 8"))
    return runs
