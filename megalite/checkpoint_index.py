"""The layout-independent description of every saved tensor, and the element arithmetic of resharding.

A saved tensor (a model parameter, an fp32 master, an Adam moment) is a *slice*: a row-major flat
range ``[start, end)`` of a rectangular *box* of one *logical* tensor::

    logical tensor   name "decoder.layers.3.mlp.linear_fc2.weight" (GLOBAL layer number), shape [h, ffn]
    box              the TP-local shard: offset 1 x ffn/2 along the split dim 1, shape [h, ffn/2]
    flat range       [start, end) of the box's elements (the whole box, or a ZeRO-1 piece)
    where            the file and the path inside it that hold the range's values

The logical tensor is the TP=1 parameter: initialization draws the full weight and keeps each
rank's slice (``layers.py``), and the fused layouts are per query group (QKV) and interleaved
per unit (SwiGLU gate/up) precisely so that a TP rank's contiguous slice holds whole groups
(``model/transformer.py``); so the concatenation of the TP shards along the split dim IS the TP=1
tensor, and no per-parameter permutation is needed.  The two copies of a tied word embedding
(first and last pipeline stage) are one logical tensor, ``embedding.word_embeddings.weight``.

Resharding compares elements by their *global coordinates*: an element at local coordinate ``c``
of a box sits at ``c + offset`` along the split dim, and its key is that coordinate ravelled
row-major in a shape large enough for every layout (:func:`element_keys`).  Keys of a slice grow
with the flat index (a box's row-major order is the global row-major order restricted to it), so
finding a target's elements in a source is one ``searchsorted``.

Vocabulary padding depends on TP (``padded_vocab_size`` is a multiple of divisible-by x TP), so
the logical embedding and output rows differ in count between layouts.  Rule: the rows both
layouts have are copied; rows beyond the saved row count are set to zero.  Padding rows are zero
at initialization and stay zero -- their logits are -inf in the loss, so they get no gradient, no
Adam moment, and weight decay of zero is zero -- so this is the value they would have had.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch

from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.param_info import param_info

__all__ = ["WORD_EMBEDDING", "VOCAB_ROWS", "global_name", "logical_box", "chunk_layer_numbers", "parameter_names",
           "describe_model", "describe_optimizer", "element_keys", "overlaps", "key_shape_of", "fill_slice"]

WORD_EMBEDDING = "embedding.word_embeddings.weight"
VOCAB_ROWS = (WORD_EMBEDDING, "output_layer.weight")   # [padded_vocab, h]: their row count depends on TP
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def global_name(local_name: str, layer_numbers: Sequence[int], tied_copy: bool) -> str:
    """A chunk's parameter name with its chunk-local layer index replaced by the global layer number;
    a copy of the tied word embedding is named after the first stage's."""
    if tied_copy:
        return WORD_EMBEDDING
    match = _LAYER.search(local_name)
    if match is None:
        return local_name
    number = layer_numbers[int(match.group(2))]
    return local_name[:match.start(2)] + str(number) + local_name[match.end(2):]


def logical_box(tensor: torch.Tensor, dim: Optional[int], tp_rank: int, tp_size: int) -> dict:
    """The logical shape and the TP-local box of a tensor split along ``dim`` into ``tp_size`` equal shards."""
    local = list(tensor.shape)
    shape = list(local)
    offset = 0
    if dim is not None:
        shape[dim] = local[dim] * tp_size
        offset = local[dim] * tp_rank
    return {"shape": shape, "dim": dim, "offset": offset, "local_shape": local}


def describe_model(model_chunks: Sequence[torch.nn.Module], layer_numbers: Sequence[Sequence[int]],
                   tp_rank: int, tp_size: int, file: str) -> List[dict]:
    """One slice (kind "param", the whole box) per state-dict entry of each chunk; ``where`` is
    ``(chunk key, local name)`` inside ``file`` (the keys ``checkpoint.save_checkpoint`` writes)."""
    slices = []
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        for name, tensor in unwrap_model(chunk).state_dict(keep_vars=True).items():
            info = param_info(tensor)
            slices.append(dict(name=global_name(name, layer_numbers[index], info.shared_embedding), kind="param",
                               **logical_box(tensor, info.partition_dim, tp_rank, tp_size), start=0, end=tensor.numel(),
                               file=file, where=[key, name]))
    return slices


def chunk_layer_numbers(model_chunks: Sequence[torch.nn.Module],
                        layer_numbers: Optional[Sequence[Sequence[int]]] = None) -> List[List[int]]:
    """The global layer numbers of each chunk: as given, else the chunk's own ``layer_numbers`` (GPTModel)."""
    if layer_numbers is not None:
        return [list(numbers) for numbers in layer_numbers]
    return [list(getattr(unwrap_model(chunk), "layer_numbers", None) or []) for chunk in model_chunks]


def parameter_names(model_chunks: Sequence[torch.nn.Module],
                    layer_numbers: Sequence[Sequence[int]]) -> Dict[int, str]:
    """id(parameter) -> its logical name, over all of a rank's chunks."""
    names = {}
    for chunk, numbers in zip(model_chunks, layer_numbers):
        for name, param in unwrap_model(chunk).named_parameters():
            names.setdefault(id(param), global_name(name, numbers, param_info(param).shared_embedding))
    return names


def describe_optimizer(optimizer, names: Dict[int, str], tp_rank: int, tp_size: int, file: str,
                       root: Sequence = ()) -> List[dict]:
    """Slices of the optimizer's pieces (``MegaliteOptimizer.state_dict()['pieces']``, stored at ``root``
    inside ``file``): the moments, and the fp32 master where the parameter has its own."""
    slices = []
    for i, piece in enumerate(optimizer.all_pieces()):
        box = logical_box(piece.param, param_info(piece.param).partition_dim, tp_rank, tp_size)
        kinds = ("exp_avg", "exp_avg_sq") + (("master",) if piece.has_own_master else ())
        for kind in kinds:
            slices.append(dict(name=names[id(piece.param)], kind=kind, **box, start=piece.start, end=piece.end,
                               file=file, where=[*root, "pieces", i, kind]))
    return slices


# -- element arithmetic ----------------------------------------------------------------------------
def element_keys(part: dict, key_shape: Sequence[int], start: Optional[int] = None,
                 end: Optional[int] = None) -> torch.Tensor:
    """Global row-major keys, in ``key_shape``, of the slice's elements ``[start, end)`` (default: all).

    int64 [end - start], strictly increasing.  ``key_shape`` must hold every coordinate of the box.
    """
    start = part["start"] if start is None else start
    end = part["end"] if end is None else end
    flat = torch.arange(start, end, dtype=torch.int64)
    keys = torch.zeros_like(flat)
    stride = 1
    for d in reversed(range(len(part["local_shape"]))):
        coordinate = flat % part["local_shape"][d]
        flat = flat // part["local_shape"][d]
        if d == part["dim"]:
            coordinate = coordinate + part["offset"]
        keys += coordinate * stride
        stride *= key_shape[d]
    return keys


def overlaps(a: dict, b: dict, key_shape: Sequence[int]) -> bool:
    """Whether two slices of one logical tensor can share an element (their key ranges meet)."""
    if a["end"] <= a["start"] or b["end"] <= b["start"]:
        return False
    a_first, a_last = element_keys(a, key_shape, a["start"], a["start"] + 1), element_keys(a, key_shape, a["end"] - 1)
    b_first, b_last = element_keys(b, key_shape, b["start"], b["start"] + 1), element_keys(b, key_shape, b["end"] - 1)
    return bool(a_first <= b_last) and bool(b_first <= a_last)


def key_shape_of(target: dict, sources: Sequence[dict]) -> List[int]:
    """A shape holding every coordinate of the target and of the sources (they differ in vocabulary rows)."""
    shape = list(target["shape"])
    for source in sources:
        if len(source["shape"]) != len(shape):
            raise ValueError(f"checkpoint tensor {target['name']} has shape {source['shape']}, this model "
                             f"{target['shape']}; it was saved for another model")
        shape = [max(a, b) for a, b in zip(shape, source["shape"])]
    return shape


@torch.no_grad()
def fill_slice(out: torch.Tensor, target: dict, sources: Sequence[dict], read) -> None:
    """Write into ``out`` (1-D, the target slice's elements) the values the ``sources`` slices hold.

    ``read(source)`` returns a source slice's values as a 1-D CPU tensor; ``out`` may live on any
    device (the values are gathered on the CPU and copied once).  Elements in rows beyond the saved
    row count (vocabulary padding of a larger TP) are set to zero; any other element that no source
    holds is an error naming the tensor.  Memory: int64 keys of the target and of one source at a time.
    """
    if not sources:
        raise ValueError(f"the checkpoint holds no {target['kind']} of {target['name']}; it was saved for another "
                         f"model")
    key_shape = key_shape_of(target, sources)
    wanted = element_keys(target, key_shape)
    filled = torch.zeros(wanted.numel(), dtype=torch.bool)
    staged = torch.zeros(wanted.numel(), dtype=out.dtype)
    for source in sources:
        if not overlaps(source, target, key_shape):
            continue
        have = element_keys(source, key_shape)
        position = torch.searchsorted(have, wanted).clamp_(max=have.numel() - 1)
        hit = have[position] == wanted
        values = read(source)
        staged[hit] = values[position[hit]].to(out.dtype)
        filled |= hit
    if not bool(filled.all()):
        _check_only_padding_is_missing(~filled, wanted, target, sources, key_shape)
    out.copy_(staged)      # the missing (padding) elements are the zeros staged was made of


def _check_only_padding_is_missing(missing: torch.Tensor, wanted: torch.Tensor, target: dict,
                                   sources: Sequence[dict], key_shape: Sequence[int]) -> None:
    # Only vocabulary rows may be missing (see the module docstring); anything else is an error.
    vocab = target["name"] in VOCAB_ROWS and key_shape
    saved_rows = min(s["shape"][0] for s in sources) if vocab else (key_shape[0] if key_shape else 0)
    row_stride = 1
    for size in key_shape[1:]:
        row_stride *= size
    padding = wanted // row_stride >= saved_rows if key_shape else torch.zeros_like(missing)
    if bool((missing & ~padding).any()):
        raise ValueError(f"the checkpoint holds no {target['kind']} values for {int((missing & ~padding).sum())} "
                         f"elements of {target['name']} (shape {target['shape']}, saved {sources[0]['shape']}); it "
                         f"was saved for another model or its tensor index is incomplete")
