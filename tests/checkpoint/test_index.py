"""The element arithmetic of resharding: slices of one logical tensor cut under one layout, filled
into slices cut under another, equal the logical tensor's own elements."""
import pytest
import torch

from megalite.checkpoint.index import Slice, fill_slice, global_name


def _slices(full: torch.Tensor, dim, tp: int, cuts_per_box: int, name="w", kind="param"):
    """(values, description) of ``full`` split into ``tp`` boxes along ``dim``, each box's flat elements
    cut into ``cuts_per_box`` uneven ranges (as ZeRO-1 cuts a bucket, across row boundaries)."""
    parts = []
    boxes = [full] if dim is None else full.chunk(tp, dim)
    for rank, box in enumerate(boxes):
        flat = box.contiguous().view(-1)
        bounds = sorted({0, flat.numel(), *[(flat.numel() * (2 * i + 1)) // (2 * cuts_per_box + 1)
                                             for i in range(cuts_per_box)]})
        for start, end in zip(bounds, bounds[1:]):
            parts.append((flat[start:end].clone(), Slice(
                name=name, kind=kind, shape=full.shape, dim=dim,
                offset=0 if dim is None else rank * box.shape[dim], local_shape=box.shape, start=start, end=end)))
    return parts


def _refill(saved, wanted_shape, dim, tp, cuts, name="w"):
    """Fill every slice of the target layout from the saved slices; return the target's values per slice."""
    values = {id(desc): value for value, desc in saved}
    sources = [desc for _, desc in saved]
    target_full = torch.full(wanted_shape, float("nan"))
    out = []
    for expected, target in _slices(target_full, dim, tp, cuts, name):
        got = torch.full_like(expected, -7.0)    # a sentinel: every element must be written
        fill_slice(got, target, sources, lambda source: values[id(source)])
        out.append((got, target))
    return out


def _assemble(parts, shape):
    """The logical tensor from slices (the test's own reference path: box by box)."""
    full = torch.empty(shape)
    for value, desc in parts:
        dim, offset = desc.dim, desc.offset
        box_index = [slice(None)] * len(shape)
        if dim is not None:
            box_index[dim] = slice(offset, offset + desc.local_shape[dim])
        box = full[tuple(box_index)].contiguous()
        box.view(-1)[desc.start:desc.end] = value
        full[tuple(box_index)] = box
    return full


@pytest.mark.parametrize("dim", [0, 1, None])
# (TP, cuts per box): one cut is a whole box (model weights: strided copies), more are ZeRO-1-like
# flat ranges (coordinate arithmetic).
@pytest.mark.parametrize("source, target", [((2, 1), (4, 1)), ((4, 1), (1, 1)), ((2, 3), (1, 1)), ((1, 1), (4, 2)),
                                            ((2, 1), (4, 5)), ((4, 2), (2, 3))])
def test_any_cut_refills_any_other_cut(dim, source, target):
    full = torch.randn(8, 12)
    saved = _slices(full, dim, *source)
    refilled = _refill(saved, full.shape, dim, *target)
    torch.testing.assert_close(_assemble(refilled, full.shape), full, rtol=0, atol=0)


def test_vocabulary_rows_copy_the_common_rows_and_zero_the_rest():
    real = 5
    saved_full = torch.zeros(8, 4)                 # padded to 8 rows at the saved TP
    saved_full[:real] = torch.randn(real, 4)
    saved = _slices(saved_full, 0, 2, 2, name="embedding.word_embeddings.weight")
    larger = _refill(saved, (16, 4), 0, 4, 1, name="embedding.word_embeddings.weight")   # more padding
    expected = torch.zeros(16, 4)
    expected[:8] = saved_full
    torch.testing.assert_close(_assemble(larger, (16, 4)), expected, rtol=0, atol=0)
    smaller = _refill(saved, (6, 4), 0, 1, 3, name="embedding.word_embeddings.weight")   # less padding
    torch.testing.assert_close(_assemble(smaller, (6, 4)), saved_full[:6], rtol=0, atol=0)
    whole = _slices(saved_full, 0, 2, 1, name="embedding.word_embeddings.weight")      # whole boxes both ways
    larger = _refill(whole, (16, 4), 0, 4, 1, name="embedding.word_embeddings.weight")
    torch.testing.assert_close(_assemble(larger, (16, 4)), expected, rtol=0, atol=0)


def test_a_tensor_the_checkpoint_does_not_cover_is_an_error():
    full = torch.randn(4, 6)
    saved = _slices(full, 0, 2, 1)[:-1]            # the last piece of the second box is lost
    with pytest.raises(ValueError, match="holds no param values for .* elements of w"):
        _refill(saved, full.shape, None, 1, 1)
    with pytest.raises(ValueError, match="holds no param of w"):
        _refill([], full.shape, None, 1, 1)
    # A larger non-vocabulary tensor is another model, not padding.
    with pytest.raises(ValueError, match="elements of w"):
        _refill(_slices(full, 0, 1, 1), (6, 6), 0, 1, 1)


def test_global_names_use_global_layer_numbers_and_one_name_for_the_tied_embedding():
    assert global_name("decoder.layers.1.mlp.linear_fc1.weight", [4, 5], False) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert global_name("output_layer.weight", [6, 7], True) == "embedding.word_embeddings.weight"
    assert global_name("final_norm.weight", [6, 7], False) == "final_norm.weight"


def test_a_slice_survives_the_tensor_index_and_a_damaged_one_is_named():
    part = Slice(name="w", kind="master", shape=[4, 6], dim=1, offset=3, local_shape=[4, 3], start=2, end=9,
                 file="mp_rank_00/optimizer_dp000_cp000.pt", where=["pieces", 0, "master"])
    saved = part.to_saved()
    assert saved["shape"] == [4, 6] and saved["where"] == ["pieces", 0, "master"]
    assert Slice.from_saved(saved) == part
    with pytest.raises(ValueError, match="the index is damaged"):
        Slice.from_saved({k: v for k, v in saved.items() if k != "where"})


def test_a_slice_with_values_no_save_writes_is_named():
    saved = Slice(name="w", kind="param", shape=[4, 6], dim=1, offset=3, local_shape=[4, 3], start=0,
                  end=12).to_saved()
    for damage in ({"start": "0"}, {"end": 13}, {"dim": 2}, {"local_shape": [4]}, {"offset": -1}):
        with pytest.raises(ValueError, match="holds values no save writes"):
            Slice.from_saved(dict(saved, **damage))


def _boxes_2d(full: torch.Tensor, ep: int, etp: int, dims=(0, 2)):
    """(values, description) of ``full`` [E, h, f] split into ep x etp boxes along two dims (experts over EP, the
    ffn over expert TP), each box whole."""
    parts = []
    for r, experts in enumerate(full.chunk(ep, dims[0])):
        for t, box in enumerate(experts.chunk(etp, dims[1])):
            parts.append((box.contiguous().view(-1).clone(), Slice(
                name="w", kind="param", shape=full.shape, dim=dims, offset=(r * box.shape[dims[0]],
                                                                            t * box.shape[dims[1]]),
                local_shape=box.shape, start=0, end=box.numel())))
    return parts


@pytest.mark.parametrize("source, target", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (4, 1)), ((2, 2), (1, 2))])
def test_boxes_split_along_two_dims_refill_any_other_split(source, target):
    """Expert stacks under EP x expert TP (checkpoint/index.py): boxes split along dims 0 and 2 refill boxes of
    another EP x ETP (or one whole box) exactly; the two-dim description survives the tensor index."""
    full = torch.randn(4, 3, 8)
    saved = [(v, Slice.from_saved(d.to_saved())) for v, d in _boxes_2d(full, *source)]
    values = {id(desc): value for value, desc in saved}
    for wanted, desc in _boxes_2d(full, *target):
        out = torch.full((desc.end,), float("nan"))
        fill_slice(out, desc, [d for _, d in saved], lambda part: values[id(part)])
        assert torch.equal(out, wanted), desc


def test_a_two_dim_box_with_unmatched_pairs_is_named():
    saved = _boxes_2d(torch.zeros(4, 3, 8), 2, 2)[0][1].to_saved()
    with pytest.raises(ValueError, match="the index is damaged"):
        Slice.from_saved(dict(saved, offset=[0]))
