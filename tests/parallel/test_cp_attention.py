"""Attention across the context-parallel split (megalite/parallel/cp_attention.py), every
``--cp-comm-type``, with and without packed documents, against one rank's attention written out
with a dense mask: the output and every gradient, the communication each type does, and the
refusals.  Whole training runs are in test_cp_parity.py.
"""
import pytest
import torch

from megalite.parallel import state
from megalite.parallel.context_parallel import split_sequence
from megalite.parallel.cp_attention import attention
from megalite.parallel.documents import Documents
from megalite.parallel.mappings import comm_counter
from megalite.parallel.masked_attention import document_index
from megalite.parallel.testing import run_on_ranks

LENGTHS = (1, 3)          # tokens per chunk: 1 puts a chunk boundary between every pair of tokens
COMM_TYPES = ("p2p", "all_gather", "a2a")


def reference_attention(q, k, v, documents=None):
    """softmax(q k^T / sqrt(d) + mask) v in float64 with the mask written out: key <= query, and
    (with documents) the same document."""
    s = q.shape[2]
    keep = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    if documents is not None:
        doc = document_index(documents)
        keep = keep & (doc[:, :, None] == doc[:, None, :])[:, None]
    heads_per_group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(heads_per_group, 1), v.repeat_interleave(heads_per_group, 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()).float()


def random_documents(batch: int, s: int, g: torch.Generator) -> Documents:
    """Starts at random positions (some documents one token long, some crossing chunk boundaries)."""
    starts = []
    for _ in range(batch):
        cuts = sorted(set(torch.randint(1, s, (max(1, s // 3),), generator=g).tolist()))
        starts.append([0] + cuts)
    return Documents.from_starts(starts, s)


def _errors(size, rank, comm_type, with_documents):
    """Max |CP - reference| over the output and dq, dk, dv, for each chunk length; and the calls made."""
    errors, calls = [], None
    for c in LENGTHS:
        s = 2 * size * c
        g = torch.Generator().manual_seed(s + 100 * with_documents)
        q, k, v = (torch.randn(2, heads, s, 8, generator=g, requires_grad=True) for heads in (4, 4, 4))
        if comm_type != "a2a" or size == 2:
            k, v = (torch.randn(2, 2, s, 8, generator=g, requires_grad=True) for _ in range(2))   # GQA, 2 groups
        documents = random_documents(2, s, g) if with_documents else None
        weight = torch.randn(2, 4, s, 8, generator=g)
        (reference_attention(q, k, v, documents) * weight).sum().backward()
        # Strided like the model's q, k, v (views of the [s, b, heads, d] projection output).
        local = [split_sequence(x.detach(), size, rank, dim=2).permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
                 .requires_grad_() for x in (q, k, v)]
        comm_counter.reset()
        out = attention(*local, None, False, documents, comm_type)
        (out * split_sequence(weight, size, rank, dim=2)).sum().backward()
        calls = dict(comm_counter.calls)
        pairs = [(out, reference_attention(q, k, v, documents))] + \
            [(x.grad, full.grad) for x, full in zip(local, (q, k, v))]
        errors.append(max((a - split_sequence(b.detach(), size, rank, dim=2)).abs().max().item() for a, b in pairs))
    return errors, calls


def _all_cases(rank, world_size):
    results = {}
    for cp in (2, 4):
        grid = state.initialize_grid(cp=cp)
        for comm_type in COMM_TYPES:
            for with_documents in (False, True):
                results[cp, comm_type, with_documents] = _errors(cp, grid.cp_rank, comm_type, with_documents)
        state.destroy_grid()
    return results


@pytest.fixture(scope="module")
def cases():
    return run_on_ranks(_all_cases, 4, timeout=300)


@pytest.mark.parametrize("with_documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("comm_type", COMM_TYPES)
@pytest.mark.parametrize("cp", [2, 4])
def test_attention_across_the_split_equals_one_rank(cases, cp, comm_type, with_documents):
    for rank_results in cases:
        errors, _ = rank_results[cp, comm_type, with_documents]
        # float32 round-off of softmax and matmuls over at most 24 keys: ~1e-6; a block attended
        # twice or missed, a wrong document cut or a gradient left on the wrong rank is O(0.1).
        assert max(errors) < 2e-5, errors


@pytest.mark.parametrize("cp", [2, 4])
def test_each_type_communicates_as_documented(cases, cp):
    ranks = cases[0]
    # Ring: (CP-1) K/V sends in forward; backward (CP-1) K/V sends and CP dK/dV sends.
    assert ranks[cp, "p2p", False][1] == {"cp_send": (cp - 1) + (cp - 1) + cp}
    # All-gather: one in forward, one again in backward, and the reduce-scatter of dK/dV.
    assert ranks[cp, "all_gather", False][1] == {"cp_all_gather": 2, "cp_reduce_scatter": 1}
    # All-to-all: q, k, v there and the output back; backward the adjoints of all four.
    assert ranks[cp, "a2a", False][1] == {"cp_all_to_all": 8}


def _one_rank_documents():
    g = torch.Generator().manual_seed(3)
    s = 24
    q, k, v = (torch.randn(2, h, s, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    documents = random_documents(2, s, g)
    out = attention(q, k, v, None, False, documents)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    reference = reference_attention(q, k, v, documents)
    (reference * weight).sum().backward()
    return max([(out - reference).abs().max().item()] + [(a - x.grad).abs().max().item()
                                                           for a, x in zip(grads, (q, k, v))])


def test_per_document_attention_on_one_rank_equals_the_masked_reference():
    assert _one_rank_documents() < 2e-5


def test_documents_refuse_starts_that_are_not_a_partition():
    with pytest.raises(ValueError, match=r"sample 1: document starts \(0, 5, 5\) must begin at 0 and ascend"):
        Documents.from_starts([[0, 3], [0, 5, 5]], 8)
    with pytest.raises(ValueError, match="must begin at 0"):
        Documents.from_starts([[1, 3]], 8)
