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

The experts' stacked weights ``[E, ...]`` (``ParamInfo.expert_parallel``) are split along dim 0 over the
expert-parallel group instead: EP rank r's box holds experts ``[r E/EP, (r+1) E/EP)`` (:func:`tensor_box`),
so a checkpoint of any EP loads at any other exactly as a TP split does.  Under expert tensor parallelism
(ETP = TP) the experts' ffn dim is split over expert TP too: the box is split along two dims, ``dim`` and
``offset`` then the pairs (0, ffn dim) and (EP offset, ETP offset); a box split along one dim keeps the plain
integers (and so every index saved before).

Resharding works box by box: an element at local coordinate ``c`` of a box sits at ``c + offset``
along the split dim, so two boxes of one logical tensor share a rectangle, copied as one strided
slice (:func:`fill_slice`); a flat range is laid into its box first (the ZeRO-1 pieces of one TP
shard, from several DP ranks, fill that shard's box together).  :func:`element_keys` ravels global
coordinates row-major in a shape large enough for every layout; keys of a slice grow with the flat
index (a box's row-major order is the global order restricted to it), so the keys of a slice's
first and last elements tell whether two slices can meet (:func:`overlaps`) without reading them.

Vocabulary padding depends on TP (``ModelConfig.padded_vocab_size(tp)`` is a multiple of divisible-by
x TP), so the logical embedding and output rows differ in count between layouts.  Rule: the rows both
layouts have are copied; rows beyond the saved row count are set to zero.  Padding rows are zero
at initialization and stay zero -- their logits are -inf in the loss, so they get no gradient, no
Adam moment, and weight decay of zero is zero -- so this is the value they would have had.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.param_info import param_info

__all__ = ["Slice", "Place", "WORD_EMBEDDING", "VOCAB_ROWS", "global_name", "logical_box", "tensor_box",
           "is_expert_shard", "chunk_layer_numbers",
           "parameter_names", "describe_model", "describe_optimizer", "element_keys", "overlaps", "key_shape_of",
           "fill_slice"]

WORD_EMBEDDING = "embedding.word_embeddings.weight"
VOCAB_ROWS = (WORD_EMBEDDING, "output_layer.weight")   # [padded_vocab, h]: their row count depends on TP
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Slice:
    """A flat range of a box of one logical tensor (the module docstring), and where its values are saved.

    The tensor index stores each as a plain dict (:meth:`to_saved`), which ``torch.load(weights_only=True)``
    reads back without running code from the file."""
    name: str                       # the logical tensor, under its global layer number
    kind: str                       # "param", "master", "exp_avg" or "exp_avg_sq"
    shape: Tuple[int, ...]          # the logical tensor's shape
    dim: Optional[int]              # the box's split dim; None when the box is the whole tensor (a tuple of
    offset: int                     # dims, and of offsets, for experts split over EP and expert TP)
    local_shape: Tuple[int, ...]    # the box's shape
    start: int                      # the range [start, end) of the box's row-major elements
    end: int
    file: Optional[str] = None      # the saved file holding the values, relative to the iteration folder
    where: tuple = ()               # the keys leading to the values inside that file

    def __post_init__(self):
        for name in ("shape", "local_shape", "where", "dim", "offset"):
            if isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def splits(self) -> Dict[int, int]:
        """{split dim: the box's offset along it} (empty for a whole tensor)."""
        if self.dim is None:
            return {}
        return dict(zip(self.dim, self.offset)) if isinstance(self.dim, tuple) else {self.dim: self.offset}

    def to_saved(self) -> dict:
        saved = asdict(self)
        pairs = {"dim": list(self.dim), "offset": list(self.offset)} if isinstance(self.dim, tuple) else {}
        return dict(saved, shape=list(self.shape), local_shape=list(self.local_shape), where=list(self.where),
                    **pairs)

    @classmethod
    def from_saved(cls, saved: dict) -> "Slice":
        names = [field.name for field in fields(cls)]
        if not isinstance(saved, dict) or set(saved) != set(names):
            found = sorted(saved) if isinstance(saved, dict) else repr(saved)
            raise ValueError(f"a slice of the tensor index has the fields {found}, not {names}; the index is damaged")
        part = cls(**saved)
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0   # noqa: E731
        shapes = (part.shape, part.local_shape)
        pairs = isinstance(part.dim, tuple) and isinstance(part.offset, tuple) and len(part.dim) == len(part.offset)
        dims, offsets = (part.dim, part.offset) if pairs else ((part.dim,), (part.offset,))
        if not (isinstance(part.name, str) and isinstance(part.kind, str) and all(map(whole, shapes[0] + shapes[1]))
                and len(part.shape) == len(part.local_shape) and all(map(whole, offsets)) and whole(part.start)
                and whole(part.end) and part.start <= part.end <= math.prod(part.local_shape)
                and (part.dim is None or all(whole(d) and d < len(part.shape) for d in dims))):
            raise ValueError(f"the tensor index's slice of {part.name!r} ({part.kind}) holds values no save writes "
                             f"(shape {part.shape}, box {part.local_shape} at {part.offset} along {part.dim}, range "
                             f"{part.start}..{part.end}); the index is damaged")
        return part


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
    """The logical shape and the local box of a tensor split along ``dim`` into ``tp_size`` equal shards
    (the box fields of a :class:`Slice`); :func:`tensor_box` picks the split of a model tensor."""
    local = list(tensor.shape)
    shape = list(local)
    offset = 0
    if dim is not None:
        shape[dim] = local[dim] * tp_size
        offset = local[dim] * tp_rank
    return {"shape": shape, "dim": dim, "offset": offset, "local_shape": local}


@dataclass(frozen=True)
class Place:
    """Where a rank sits among the splits a saved tensor can have: its TP and expert-parallel coordinates."""
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1

    @classmethod
    def of(cls, grid) -> "Place":
        return cls(grid.tp_rank, grid.tp_size, getattr(grid, "ep_rank", 0), getattr(grid, "ep_size", 1),
                   getattr(grid, "etp_rank", 0), getattr(grid, "etp_size", 1))


def is_expert_shard(tensor: torch.Tensor, place: Place) -> bool:
    """Whether the tensor is this rank's share of the experts' stacked weights (EP > 1): ranks of one
    TP x CP x DP group hold different ones, so they are saved from each expert-parallel rank."""
    return place.ep_size > 1 and param_info(tensor).expert_parallel


def tensor_box(tensor: torch.Tensor, place: Place) -> dict:
    """The box of a model tensor (or of the parameter of an optimizer piece): a TP shard along its partition
    dim, or -- the experts' stacked weights under EP > 1 -- experts ``[ep_rank E/EP, (ep_rank+1) E/EP)``
    of the global ``[E, ...]`` stack, along dim 0, and under expert TP its ffn slice along the partition dim too
    (etp_rank of ETP: a box split along two dims)."""
    info = param_info(tensor)
    if not is_expert_shard(tensor, place):   # (under expert TP at EP 1 an expert is a TP shard: ETP = TP)
        return logical_box(tensor, info.partition_dim, place.tp_rank, place.tp_size)
    box = logical_box(tensor, 0, place.ep_rank, place.ep_size)
    if info.partition_dim is None or place.etp_size == 1:
        return box
    ffn = logical_box(tensor, info.partition_dim, place.etp_rank, place.etp_size)
    shape = [box["shape"][0]] + ffn["shape"][1:]
    return {"shape": shape, "dim": (0, info.partition_dim), "offset": (box["offset"], ffn["offset"]),
            "local_shape": box["local_shape"]}


def describe_model(model_chunks: Sequence[torch.nn.Module], layer_numbers: Sequence[Sequence[int]],
                   place: Place, file: str, keep=lambda tensor: True) -> List[Slice]:
    """One slice (kind "param", the whole box) per state-dict entry of each chunk that ``keep`` accepts;
    ``where`` is ``(chunk key, local name)`` inside ``file`` (the keys ``checkpoint.save_checkpoint`` writes)."""
    slices = []
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        for name, tensor in unwrap_model(chunk).state_dict(keep_vars=True).items():
            if not keep(tensor):
                continue
            info = param_info(tensor)
            slices.append(Slice(name=global_name(name, layer_numbers[index], info.shared_embedding), kind="param",
                                **tensor_box(tensor, place), start=0, end=tensor.numel(), file=file,
                                where=(key, name)))
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


def describe_optimizer(optimizer, names: Dict[int, str], place: Place, file: str, root: Sequence = (),
                       keep=lambda tensor: True) -> List[Slice]:
    """Slices of the optimizer's pieces (``MegaliteOptimizer.state_dict()['pieces']``, stored at ``root``
    inside ``file``) whose parameter ``keep`` accepts: the moments, and the fp32 master where the parameter
    has its own.  ``where`` ends with the piece's position among all of this rank's pieces."""
    slices = []
    for i, piece in enumerate(optimizer.all_pieces()):
        if not keep(piece.param):
            continue
        box = tensor_box(piece.param, place)
        kinds = ("exp_avg", "exp_avg_sq") + (("master",) if piece.has_own_master else ())
        for kind in kinds:
            slices.append(Slice(name=names[id(piece.param)], kind=kind, **box, start=piece.start, end=piece.end,
                                file=file, where=(*root, "pieces", i, kind)))
    return slices


# -- element arithmetic ----------------------------------------------------------------------------
def element_keys(part: Slice, key_shape: Sequence[int], start: Optional[int] = None,
                 end: Optional[int] = None) -> torch.Tensor:
    """Global row-major keys, in ``key_shape``, of the slice's elements ``[start, end)`` (default: all).

    int64 [end - start], strictly increasing.  ``key_shape`` must hold every coordinate of the box.
    """
    start = part.start if start is None else start
    end = part.end if end is None else end
    flat = torch.arange(start, end, dtype=torch.int64)
    keys = torch.zeros_like(flat)
    stride = 1
    splits = part.splits
    for d in reversed(range(len(part.local_shape))):
        coordinate = flat % part.local_shape[d]
        flat = flat // part.local_shape[d]
        coordinate = coordinate + splits.get(d, 0)
        keys += coordinate * stride
        stride *= key_shape[d]
    return keys


def overlaps(a: Slice, b: Slice, key_shape: Sequence[int]) -> bool:
    """Whether two slices of one logical tensor can share an element (their key ranges meet)."""
    if a.end <= a.start or b.end <= b.start:
        return False
    a_first, a_last = element_keys(a, key_shape, a.start, a.start + 1), element_keys(a, key_shape, a.end - 1)
    b_first, b_last = element_keys(b, key_shape, b.start, b.start + 1), element_keys(b, key_shape, b.end - 1)
    return bool(a_first <= b_last) and bool(b_first <= a_last)


def key_shape_of(target: Slice, sources: Sequence[Slice]) -> List[int]:
    """A shape holding every coordinate of the target and of the sources (they differ in vocabulary rows)."""
    shape = list(target.shape)
    for source in sources:
        if len(source.shape) != len(shape):
            raise ValueError(f"checkpoint tensor {target.name} has shape {list(source.shape)}, this model "
                             f"{list(target.shape)}; it was saved for another model")
        shape = [max(a, b) for a, b in zip(shape, source.shape)]
    return shape


def _box_ranges(part: Slice) -> List[range]:
    """The global coordinates the slice's box spans, per dim."""
    splits = part.splits
    return [range(splits.get(d, 0), splits.get(d, 0) + size) for d, size in enumerate(part.local_shape)]


def _intersection(target: Slice, source: Slice) -> Optional[Tuple[tuple, tuple]]:
    """(index into the target box, index into the source box) of the rectangle both boxes cover."""
    into, out_of = [], []
    for mine, theirs in zip(_box_ranges(target), _box_ranges(source)):
        lo, hi = max(mine.start, theirs.start), min(mine.stop, theirs.stop)
        if lo >= hi:
            return None
        into.append(slice(lo - mine.start, hi - mine.start))
        out_of.append(slice(lo - theirs.start, hi - theirs.start))
    return tuple(into), tuple(out_of)


@torch.no_grad()
def fill_slice(out: torch.Tensor, target: Slice, sources: Sequence[Slice], read) -> None:
    """Write into ``out`` (1-D, the target slice's elements) the values the ``sources`` slices hold.

    ``read(source)`` returns a source slice's values as a 1-D CPU tensor; ``out`` may live on any
    device.  Boxes do the work: the saved ranges of one box (the ZeRO-1 pieces of one TP shard,
    from several DP ranks' files) are laid into that box, the rectangle it shares with the
    target's box is copied as one strided slice, and the target's range is cut from its box.
    Memory: the target's box and one source box (TP-local tensors), on the CPU.  Elements in rows
    beyond the saved row count (vocabulary padding of a larger TP) are set to zero; any other
    element that no source holds is an error naming the tensor.
    """
    if not sources:
        raise ValueError(f"the checkpoint holds no {target.kind} of {target.name}; it was saved for another "
                         f"model")
    key_shape = key_shape_of(target, sources)
    box = torch.zeros(target.local_shape, dtype=out.dtype)
    filled = torch.zeros(target.local_shape, dtype=torch.bool)
    by_box: Dict[tuple, List[Slice]] = {}
    for source in sources:
        if overlaps(source, target, key_shape):
            by_box.setdefault((tuple(source.splits.items()), tuple(source.local_shape)), []).append(source)
    for pieces in by_box.values():
        meeting = _intersection(target, pieces[0])
        if meeting is None:
            continue
        source_box = torch.zeros(pieces[0].local_shape, dtype=out.dtype)
        source_has = torch.zeros(pieces[0].local_shape, dtype=torch.bool)
        for piece in pieces:
            source_box.view(-1)[piece.start:piece.end] = read(piece).to(out.dtype)
            source_has.view(-1)[piece.start:piece.end] = True
        into, out_of = meeting
        has = source_has[out_of]
        box[into] = torch.where(has, source_box[out_of], box[into])
        filled[into] |= has
    wanted = filled.view(-1)[target.start:target.end]
    if not bool(wanted.all()):
        _check_only_padding_is_missing(~filled, target, sources)
    out.copy_(box.view(-1)[target.start:target.end])   # missing padding rows: the zeros box began with


def _check_only_padding_is_missing(missing: torch.Tensor, target: Slice, sources: Sequence[Slice]) -> None:
    """``missing``: the target's box, True where no source had the element (only its range matters)."""
    missing = missing.reshape(-1).clone()
    missing[:target.start] = False
    missing[target.end:] = False
    # Only vocabulary rows may be missing (see the module docstring); anything else is an error.
    if target.name in VOCAB_ROWS and target.local_shape:
        first_row = target.splits.get(0, 0)
        saved_local_rows = max(0, min(s.shape[0] for s in sources) - first_row)
        missing = missing.view(target.local_shape[0], -1)[:saved_local_rows]
    if bool(missing.any()):
        raise ValueError(f"the checkpoint holds no {target.kind} values for {int(missing.sum())} elements of "
                         f"{target.name} (shape {list(target.shape)}, saved {list(sources[0].shape)}); it was saved "
                         f"for another model or its tensor index is incomplete")
