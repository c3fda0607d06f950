"""Time of the collectives of a step: the alpha-beta (latency-bandwidth) model of ring algorithms.

For ``n`` ranks, a message of ``B`` bytes (the whole tensor), bandwidth ``bw`` per direction per rank
and per-hop latency ``alpha`` (Thakur, Rabenseifner and Gropp 2005; NCCL's ring):

    all-reduce       2 (n-1)/n * B / bw + 2 (n-1) alpha       (reduce-scatter, then all-gather)
    all-gather       (n-1)/n * B / bw + (n-1) alpha           (B: the gathered size)
    reduce-scatter   (n-1)/n * B / bw + (n-1) alpha           (B: the size before scattering)
    point-to-point   B / bw + alpha
    all-to-all       (n-1)/n * B / bw + (n-1) alpha       (B: what one rank sends, B/n to each rank,
                                                           itself included; n-1 pairwise exchanges)

Which link a group uses follows the Megatron grid order (TP fastest, then CP, DP, PP:
``rank = tp + TP*(cp + CP*(dp + DP*pp))``): a group whose members are ``stride`` ranks apart spans
nodes when ``stride * size > gpus_per_node``.  Inside a node it runs on NVLink; across nodes each of
the ``k`` members a node holds drives its own network card, so the ring's node-crossing bandwidth is
``min(NVLink, k * IB per GPU)`` (NCCL runs one ring per card) and its latency the network's.
A calibrated CPU's link carries each collective's own fit of these formulas (``Link.for_collective``):
gloo's algorithms are not NCCL's rings, and its all-reduce and reduce-scatter cost more than the ring
form of its send/recv would say.  Those fits depend on ``gap_s``, the compute before the call (the
ranks' drift); the model passes the compute of the pass each collective follows.

What a step sends, per micro-batch and layer (``s`` tokens, ``b`` micro-batch, ``h`` hidden, ``e`` bytes):
tensor parallelism all-reduces ``sbh e`` twice in forward and twice in backward (Shoeybi et al.
2019, Fig. 3), or with sequence parallelism all-gathers and reduce-scatters it as often (Korthikanti
et al. 2022, Sec. 4.2.2), plus, in backward, the two all-gathers of the column-parallel inputs that
megalite (like Megatron) gathers again for the weight gradients; full recompute repeats the
forward's.  Pipeline stages exchange one
activation ``[s, b, h]`` (``/t`` with SP) per chunk forward and one gradient per chunk backward.  Data
parallelism all-reduces the fp32 gradient buffer once per step (ZeRO-1: reduce-scatter, then the
all-gather of the updated parameters in their own dtype).

Context parallelism passes K/V around a ring (Liu et al. 2023, "Ring Attention"; Megatron's CP):
each of the ``CP`` ranks holds one block of ``s/CP`` tokens' K and V, ``2 (s/CP) b g d e / t`` bytes
(``g`` query groups of ``d``), and in one layer's forward sends it on and receives the next block
``CP - 1`` times; backward passes the K/V blocks round again and the dK/dV blocks with them, ``2 (CP - 1)``
transfers.  Each transfer is a point-to-point step of the ring (every rank sends and receives at once,
so it costs one message time); the attention core of the current block runs meanwhile, and on a GPU
only what the core does not hide is exposed (predict.py).

Around the layers (``tp_embedding_time``, ``tp_logits_time``): the vocabulary-parallel embedding
all-reduces its ``sbh e`` output (with SP then keeps its tokens, and backward all-gathers their
gradient); the output layer's input is copied to the TP ranks (backward all-reduces its gradient;
with SP all-gathered forward, gathered again and reduce-scattered backward); the vocabulary-parallel cross-entropy
all-reduces three fp32 values per token (the max logit, the target's logit, the sum of
exponentials).
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.scaling.hardware import Hardware, Link

__all__ = ["all_reduce_time", "all_gather_time", "reduce_scatter_time", "all_to_all_time", "p2p_time", "group_link",
           "GridStrides", "tp_collectives_per_layer", "tp_time_per_layer", "tp_embedding_time", "tp_logits_time",
           "pp_message_bytes", "dp_gradient_time", "zero1_gather_time", "kv_block_bytes", "cp_ring_times",
           "cp_exchange_times", "zero3_times"]


def all_reduce_time(nbytes: float, n: int, link: Link, gap_s: float = 0.0) -> float:
    if n <= 1:
        return 0.0
    link = link.for_collective("all_reduce", gap_s)
    return 2 * (n - 1) / n * nbytes / (link.bandwidth_gbs * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6


def _half_ring(nbytes: float, n: int, link: Link) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / (link.bandwidth_gbs * 1e9) + (n - 1) * link.latency_us * 1e-6


def all_gather_time(nbytes: float, n: int, link: Link, gap_s: float = 0.0) -> float:
    return _half_ring(nbytes, n, link.for_collective("all_gather", gap_s))


def reduce_scatter_time(nbytes: float, n: int, link: Link, gap_s: float = 0.0) -> float:
    """The same ring as the all-gather, the same bytes on every hop (a measured link may differ)."""
    return _half_ring(nbytes, n, link.for_collective("reduce_scatter", gap_s))


def all_to_all_time(nbytes: float, n: int, link: Link, gap_s: float = 0.0) -> float:
    """Every rank sends ``nbytes / n`` to each of the ``n`` ranks (the expert dispatch; experts.py)."""
    return _half_ring(nbytes, n, link.for_collective("all_to_all", gap_s))


def p2p_time(nbytes: float, link: Link, gap_s: float = 0.0) -> float:
    link = link.for_collective("send_recv", gap_s)
    return nbytes / (link.bandwidth_gbs * 1e9) + link.latency_us * 1e-6


def group_link(hardware: Hardware, size: int, stride: int) -> Link:
    """The link a ring of ``size`` ranks, ``stride`` apart in the global rank order, runs on."""
    per_node = hardware.gpus_per_node
    if size <= 1 or size * stride <= per_node:
        return hardware.intra_node
    members_per_node = max(1, min(size, per_node // stride))
    bandwidth = min(hardware.intra_node.bandwidth_gbs, members_per_node * hardware.inter_node.bandwidth_gbs)
    return Link(bandwidth, hardware.inter_node.latency_us)


@dataclass(frozen=True)
class GridStrides:
    """Group sizes of a layout; strides follow ``rank = tp + TP*(cp + CP*(dp + DP*pp))``; the expert groups
    fold into a stage's ``TP x CP x DP`` ranks (layout.py)."""

    tp: int
    cp: int
    dp: int
    pp: int
    ep: int = 1
    etp: int = 1

    def ep_link(self, hw: Hardware) -> Link:
        """An expert-parallel group: ``EP`` ranks ``ETP`` apart (the expert ranks of a stage run expert TP
        fastest, then EP, then expert-DP: parallel/state.py)."""
        return group_link(hw, self.ep, self.etp)

    def etp_link(self, hw: Hardware) -> Link:
        """An expert-tensor-parallel group: ``ETP`` consecutive ranks."""
        return group_link(hw, self.etp, 1)

    def expert_link(self, hw: Hardware) -> Link:
        """The expert-TP x EP group (the allgather dispatcher's): ``ETP x EP`` consecutive ranks."""
        return group_link(hw, self.ep * self.etp, 1)

    def edp_link(self, hw: Hardware) -> Link:
        """An expert-data-parallel group: the ``TP x CP x DP / (EP ETP)`` ranks ``EP ETP`` apart holding the
        same experts."""
        return group_link(hw, self.tp * self.cp * self.dp // (self.ep * self.etp), self.ep * self.etp)

    def tp_link(self, hw: Hardware) -> Link:
        return group_link(hw, self.tp, 1)

    def dp_link(self, hw: Hardware) -> Link:
        # gradients are averaged over DP x CP: CP ranks sit between TP and DP, so the group is contiguous in cp
        return group_link(hw, self.dp * self.cp, self.tp)

    def pp_link(self, hw: Hardware) -> Link:
        """Neighbouring stages are TP*CP*DP ranks apart; once the pipeline spans nodes some stage boundary
        crosses one, and the slowest boundary paces the pipeline."""
        stride = self.tp * self.cp * self.dp
        return hw.inter_node if stride * self.pp > hw.gpus_per_node else hw.intra_node


def tp_collectives_per_layer(sequence_parallel: bool, backward: bool) -> int:
    """How many collectives one layer's pass calls: 2 all-reduces; with SP 2 all-gathers and 2
    reduce-scatters, and in backward 2 more all-gathers (the input of QKV and fc1, gathered again
    for their weight gradients rather than kept from the forward)."""
    return (6 if backward else 4) if sequence_parallel else 2


def tp_time_per_layer(tokens_bytes: float, tp: int, link: Link, sequence_parallel: bool,
                      gap_s: float = 0.0, backward: bool = False) -> float:
    """One layer's tensor-parallel communication in one pass direction (collectives of ``sbh e``)."""
    if sequence_parallel:
        gathers = 4 if backward else 2
        return (gathers * all_gather_time(tokens_bytes, tp, link, gap_s)
                + 2 * reduce_scatter_time(tokens_bytes, tp, link, gap_s))
    return 2 * all_reduce_time(tokens_bytes, tp, link, gap_s)


def tp_embedding_time(tokens_bytes: float, tp: int, link: Link, sequence_parallel: bool,
                      gap_s: float = 0.0) -> tuple:
    """(forward, backward) seconds of the vocabulary-parallel embedding's collectives, one micro-batch."""
    backward = all_gather_time(tokens_bytes, tp, link, gap_s) if sequence_parallel else 0.0
    return all_reduce_time(tokens_bytes, tp, link, gap_s), backward


def tp_logits_time(tokens_bytes: float, tokens: int, tp: int, link: Link, sequence_parallel: bool,
                   gap_forward_s: float = 0.0, gap_backward_s: float = 0.0) -> tuple:
    """(forward, backward) seconds of the output layer's and the cross-entropy's collectives (``tokens``
    = s b of one micro-batch on this rank), one micro-batch; the gaps: the output layer's compute
    before them in each pass.  The loss's three follow each other with little compute between and are read at
    gap 0 (a calibrated link's shortest measured gap, 2 ms: an overestimate of their cost)."""
    loss = 3 * all_reduce_time(4.0 * tokens, tp, link)
    if sequence_parallel:   # backward: the input gathered again for the weight gradient, then reduce-scattered
        return (all_gather_time(tokens_bytes, tp, link, gap_forward_s) + loss,
                all_gather_time(tokens_bytes, tp, link, gap_backward_s)
                + reduce_scatter_time(tokens_bytes, tp, link, gap_backward_s))
    return loss, all_reduce_time(tokens_bytes, tp, link, gap_backward_s)


def kv_block_bytes(tokens: int, micro_batch: int, query_groups: int, head_dim: int, element_size: int,
                   tp: int) -> float:
    """One CP rank's K and V for its ``tokens`` (= s/CP) on one TP rank: ``2 tokens b g d e / t``."""
    return 2.0 * tokens * micro_batch * query_groups * head_dim * element_size / tp


def cp_ring_times(kv_block: float, cp: int, link: Link, gap_forward_s: float = 0.0,
                  gap_backward_s: float = 0.0) -> tuple:
    """(forward, backward) seconds of one layer's K/V ring over ``cp`` ranks: ``CP - 1`` block transfers
    forward, ``2 (CP - 1)`` backward (K/V again, and dK/dV)."""
    if cp <= 1:
        return 0.0, 0.0
    return ((cp - 1) * p2p_time(kv_block, link, gap_forward_s),
            2 * (cp - 1) * p2p_time(kv_block, link, gap_backward_s))


def cp_exchange_times(kv_block: float, query_block: float, cp: int, link: Link, comm_type: str = "p2p",
                      gap_forward_s: float = 0.0, gap_backward_s: float = 0.0) -> tuple:
    """(forward, backward) seconds of one layer's CP exchange by ``--cp-comm-type`` (docs/long_context.md's
    table): ``p2p`` the K/V ring (cp_ring_times); ``all_gather`` one all-gather of every rank's ``kv_block``
    forward, and backward that all-gather again and a reduce-scatter of dK/dV (``(C - 1) B`` and ``2 (C - 1) B``
    sent); ``a2a`` four all-to-alls each way -- q and the output (``query_block`` each: one rank's
    ``b (a/t) (s/C) d e``) and k and v (half of ``kv_block`` each): ``(C - 1)/C (2Q + B)``."""
    if cp <= 1:
        return 0.0, 0.0
    if comm_type == "p2p":
        return cp_ring_times(kv_block, cp, link, gap_forward_s, gap_backward_s)
    if comm_type == "all_gather":
        gathered = cp * kv_block
        return (all_gather_time(gathered, cp, link, gap_forward_s),
                all_gather_time(gathered, cp, link, gap_backward_s) + reduce_scatter_time(gathered, cp, link,
                                                                                          gap_backward_s))
    if comm_type == "a2a":
        def four(gap_s: float) -> float:
            return 2 * (all_to_all_time(query_block, cp, link, gap_s) + all_to_all_time(kv_block / 2, cp, link, gap_s))
        return four(gap_forward_s), four(gap_backward_s)
    raise ValueError(f"--cp-comm-type {comm_type} has no cost model; use p2p, all_gather or a2a")


def pp_message_bytes(seq: int, micro_batch: int, hidden: int, element_size: int, tp: int,
                     sequence_parallel: bool) -> float:
    """The activation (and its gradient) between two stages: ``[s, b, h]``, ``[s/t, b, h]`` with SP."""
    return seq * micro_batch * hidden * element_size / (tp if sequence_parallel else 1)


def dp_gradient_time(grad_elements: float, dp: int, link: Link, zero1: bool, gap_s: float = 0.0) -> float:
    """The data-parallel gradient average of the fp32 grad buffer (``grad_elements`` on this rank):
    an all-reduce of ``4 N`` bytes, or with ZeRO-1 a reduce-scatter of them."""
    grad_bytes = 4.0 * grad_elements
    if zero1:
        return reduce_scatter_time(grad_bytes, dp, link, gap_s)
    return all_reduce_time(grad_bytes, dp, link, gap_s)


def zero1_gather_time(param_elements: float, param_element_size: int, dp: int, link: Link,
                      gap_s: float = 0.0) -> float:
    """ZeRO-1's all-gather of the updated parameters (``e N`` bytes) after the optimizer step."""
    return all_gather_time(param_element_size * param_elements, dp, link, gap_s)


def zero3_times(param_elements: float, element_size: int, shards: int, link: Link) -> tuple:
    """(forward, backward) seconds of ZeRO-3's traffic for one micro-batch on a rank holding
    ``param_elements`` (unsharded count) over ``shards`` ranks: the weights all-gathered (``e N``)
    before the forward and again before the backward, and their gradient reduce-scattered in the run's
    precision (``e N``, FSDP's default) after it -- Rajbhandari et al. 2020, Sec. 7.2.2: 3 x the
    parameter bytes against an all-reduce's 2."""
    gather = all_gather_time(element_size * param_elements, shards, link)
    return gather, gather + reduce_scatter_time(element_size * param_elements, shards, link)
