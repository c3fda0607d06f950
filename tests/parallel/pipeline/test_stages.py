import pytest

from megalite.model.build import build_model_chunks
from megalite.parallel.param_info import param_info
from megalite.parallel.pipeline.stages import layer_numbers_for, virtual_stage_layer_counts
from megalite.parallel.testing import run_on_ranks

from .harness import model_config


@pytest.mark.parametrize("layers,pp,v,first,last,expected", [
    (8, 2, None, None, None, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (8, 2, 2, None, None, [[0, 1, 4, 5], [2, 3, 6, 7]]),          # round-robin virtual chunks
    (7, 3, None, 1, None, [[0], [1, 2, 3], [4, 5, 6]]),
    (8, 4, None, 1, 1, [[0], [1, 2, 3], [4, 5, 6], [7]]),
    (10, 3, 2, 2, 4, [[0, 5], [1, 2, 6, 7], [3, 4, 8, 9]]),   # uneven ends, split over chunks
])
def test_layer_numbers(layers, pp, v, first, last, expected):
    got = [sum((layer_numbers_for(layers, pp, r, v, c, first, last) for c in range(v or 1)), []) for r in range(pp)]
    assert got == expected
    assert sorted(sum(got, [])) == list(range(layers))


@pytest.mark.parametrize("args,message", [
    ((7, 2, None), "use a multiple of 2 layers"),
    ((8, 2, None, 9), "do not add up"),
    ((8, 2, 2, 3, 5), "does not split into 2 virtual chunks"),
    ((8, 1, None, 4), "need a pipeline size > 1"),
])
def test_layer_split_errors(args, message):
    with pytest.raises(ValueError, match=message):
        virtual_stage_layer_counts(*args)


def _chunks(rank, world_size):
    from megalite.parallel.state import initialize_grid
    grid = initialize_grid(pp=world_size, virtual_pp=2)
    chunks = build_model_chunks(model_config("gpt", num_layers=8), grid)  # GPTModel by default
    return [(c.pre_process, c.post_process, c.layer_numbers, len(c.decoder.layers),
             sorted(n for n, p in c.named_parameters() if param_info(p).shared_embedding)) for c in chunks]


def test_build_model_chunks_places_embedding_and_output():
    first, last = run_on_ranks(_chunks, 2)
    # Rank 0 chunk 0 holds the embedding, rank 1's last chunk the output layer: both carry the tied weight.
    assert first == [(True, False, [0, 1], 2, ["embedding.word_embeddings.weight"]), (False, False, [4, 5], 2, [])]
    assert last == [(False, False, [2, 3], 2, []), (False, True, [6, 7], 2, ["output_layer.weight"])]
