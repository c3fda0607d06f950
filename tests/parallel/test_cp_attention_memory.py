"""Attention under context parallelism never forms the ``s/CP x s`` score matrix: the peak resident
memory that one attention forward and backward adds, per CP rank, measured by the kernel (Linux's
peak-RSS counter, reset before the call), at a size where that matrix would dominate.  Attention
written out over the gathered keys, which does form it, is measured the same way: proof that the
measurement can fail."""
import gc
import os

import pytest
import torch

from megalite.parallel import state
from megalite.parallel.context_parallel import chunk_ids, gather_from_cp, merge_sequence, split_sequence
from megalite.parallel.cp_attention import attention
from megalite.parallel.documents import Documents
from megalite.parallel.testing import run_on_ranks

S, HEADS, HEAD_DIM, CP = 4096, 4, 32, 2
SCORE_BYTES = (S // CP) * S * HEADS * 4          # one float32 s/CP x s score matrix per head: 128 MiB
CLEAR_REFS = "/proc/self/clear_refs"

pytestmark = pytest.mark.skipif(not os.path.exists(CLEAR_REFS), reason="needs Linux's peak-RSS reset")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_growth(fn) -> int:
    """Bytes by which the resident set's peak rises above its level before ``fn()``."""
    gc.collect()
    with open(CLEAR_REFS, "w") as f:
        f.write("5")                                   # the peak (VmHWM) restarts from the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _attention_step(q, k, v, run):
    local = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = run(*local)
    out.backward(torch.ones_like(out))


def _written_out(q, k, v):
    """softmax(q k^T + causal mask) v over the gathered keys, the scores formed: what must not happen."""
    kv = gather_from_cp(torch.stack([k, v]), dim=3)
    k, v = merge_sequence(kv.chunk(CP, dim=3), dim=3).repeat_interleave(2, dim=2).unbind(0)
    c = q.shape[2] // 2
    positions = torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(CP, state.get_grid().cp_rank)])
    keep = positions[:, None] >= torch.arange(S)[None, :]
    scores = (q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5).masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


def _measure(rank, world_size):
    torch.manual_seed(0)
    grid = state.initialize_grid(cp=CP)
    q, k, v = (split_sequence(torch.randn(1, heads, S, HEAD_DIM), CP, grid.cp_rank, dim=2)
               for heads in (HEADS, HEADS // 2, HEADS // 2))         # grouped-query: 2 key/value groups
    documents = Documents.from_starts([[0, 1000, 1001, 3000]], S)
    results = {}
    for comm in ("p2p", "all_gather", "a2a"):
        for docs in (None, documents):
            run = lambda q, k, v, c=comm, d=docs: attention(q, k, v, None, False, d, c)  # noqa: E731
            _attention_step(q, k, v, run)             # warm-up: kernels' first-call buffers
            results[comm, docs is not None] = _peak_growth(lambda r=run: _attention_step(q, k, v, r))
    results["written out"] = _peak_growth(lambda: _attention_step(q, k, v, _written_out))
    state.destroy_grid()
    return results


@pytest.fixture(scope="module")
def peaks():
    return run_on_ranks(_measure, CP, timeout=300)


def test_no_cp_type_forms_the_score_matrix(peaks):
    for rank, results in enumerate(peaks):
        for key, grown in results.items():
            if key == "written out":
                continue
            print(f"\nrank {rank} {key}: peak +{grown / 2**20:.1f} MiB (score matrix {SCORE_BYTES / 2**20:.0f} MiB)")
            # q, k, v, out and their gradients are ~1 MiB each here; the blocks' kernels keep tiles.
            assert grown < SCORE_BYTES / 4, (rank, key, grown)


def test_attention_written_out_is_seen_forming_it(peaks):
    for results in peaks:
        assert results["written out"] > SCORE_BYTES, results["written out"]
