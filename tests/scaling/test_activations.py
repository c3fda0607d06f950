"""The activation inventory against Korthikanti et al. 2022's closed forms (Eq. 1, 2 and 4 and the
recompute variants), for the paper's 22B configuration: s=2048, b=4, h=6144, a=64, t=8, 16-bit."""
import pytest

from megalite.scaling.activations import activation_bytes_per_layer, layer_inventory

S, B, H, A, T = 2048, 4, 6144, 64, 8
SBH = S * B * H
CASES = {   # name: (flags, the paper's closed form in bytes)
    "no parallelism": (dict(), SBH * (34 + 5 * A * S / H)),                                     # Eq. 1
    "tensor parallel": (dict(tp=T), SBH * (10 + 24 / T + 5 * A * S / (H * T))),                   # Eq. 2
    "tensor + sequence parallel": (dict(tp=T, sequence_parallel=True), SBH / T * (34 + 5 * A * S / H)),  # Eq. 4
    "tensor parallel + selective": (dict(tp=T, recompute="selective"), SBH * (10 + 24 / T)),
    "tensor + sequence parallel + selective": (dict(tp=T, sequence_parallel=True, recompute="selective"),
                                               SBH * 34 / T),
    "full recompute": (dict(tp=T, recompute="full"), 2 * SBH),
}


@pytest.mark.parametrize("case", CASES)
def test_inventory_gives_korthikanti_equations(case):
    flags, closed_form = CASES[case]
    assert activation_bytes_per_layer(S, B, H, A, **flags) == pytest.approx(closed_form, rel=1e-12)


def test_inventory_items_and_refusals():
    items = {item.name: item for item in layer_inventory(S, B, H, A)}
    assert items["softmax output"].elements == A * S * S * B and items["softmax output"].attention_scores
    assert not items["QKV input"].tensor_parallel            # replicated over TP, before the column split
    # Without dropout the masks and the dropout output go: 34 - 2 bytes per sbh, 5 - 3 per as^2b.
    assert activation_bytes_per_layer(S, B, H, A, dropout=False) == pytest.approx(SBH * 32 + 2 * A * S * S * B)
    with pytest.raises(ValueError, match="recompute 'block'"):
        activation_bytes_per_layer(S, B, H, A, recompute="block")
