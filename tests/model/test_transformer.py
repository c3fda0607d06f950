"""megalite/model/transformer.py: grouped-query attention without torch's enable_gqa (torch < 2.5)."""
import pytest
import torch

from megalite.model import transformer


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_attention_without_enable_gqa_matches_with_it(monkeypatch, groups):
    # The torch < 2.5 path (k and v repeated per query head) against the one this torch takes.
    # Under torch < 2.5 both sides run the fallback and the test cannot tell them apart: the
    # oracle is then the parity tests, which train GQA models against one process.
    torch.manual_seed(0)
    q = torch.randn(2, 8, 5, 4)
    k, v = torch.randn(2, groups, 5, 4), torch.randn(2, groups, 5, 4)
    reference = transformer.causal_attention(q, k, v, 0.0)
    monkeypatch.setattr(transformer, "SDPA_TAKES_GQA", False)
    # atol: the same values through the same kernel, so only fp32 round-off of reordered sums differs.
    torch.testing.assert_close(transformer.causal_attention(q, k, v, 0.0), reference, rtol=0, atol=1e-6)
    # Head 5 of 8 reads group 5 // (8 / groups): the layout the fused QKV weight assumes.
    group = 5 // (8 // groups)
    scores = (q[:, 5] @ k[:, group].transpose(-1, -2) / 2.0).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(reference[:, 5], scores.softmax(-1) @ v[:, group], rtol=0, atol=1e-6)
