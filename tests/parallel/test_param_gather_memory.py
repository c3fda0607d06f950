"""ZeRO-3 (parallel/param_gather.py): what autograd saves in a unit's forward does not keep that unit's whole
parameters alive until its backward, and backward still computes with the right values.

``F.linear`` saves ``weight.t()`` for its backward: a view that shares the storage of the gathered bucket.
If each gather allocated a fresh whole bucket, those views would hold every unit's whole parameters from
its forward to its backward -- the whole model at the end of forward, the peak no sharding has.
"""
import copy

import torch
import torch.nn as nn

from megalite.parallel.data_parallel import DistributedDataParallel
from megalite.parallel.state import destroy_grid, initialize_grid
from megalite.parallel.testing import run_on_ranks

WIDTH, LAYERS = 64, 3


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().sum()


def _saved_tensors(loss):
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_") and isinstance(getattr(node, name), torch.Tensor):
                found.append(getattr(node, name))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _check(rank, world_size, overlap):
    grid = initialize_grid()
    try:
        reference = Stack()
        ddp = DistributedDataParallel(copy.deepcopy(reference), grid, sharding_strategy="optim_grads_params",
                                      overlap_param_gather=overlap)
        x = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(1))   # the same on both ranks
        loss = ddp(x)
        bucket_bytes = min(b.numel for b in ddp.buckets) * 4
        held = [t.untyped_storage().nbytes() for t in _saved_tensors(loss)]
        assert max(held) < bucket_bytes, f"a saved tensor holds {max(held)} bytes, a whole bucket is {bucket_bytes}"
        loss.backward()
        reference(x).backward()
        for ref, param in zip(reference.parameters(), ddp.module.parameters()):
            bucket = ddp._bucket_of[id(param)]
            p_start, p_end = bucket.param_range[id(param)]
            start, end = bucket.owned_range()
            lo, hi = max(start, p_start), min(end, p_end)
            expected = ref.grad.reshape(-1)[lo - p_start:max(hi, lo) - p_start]
            torch.testing.assert_close(ddp.local_grad(param), expected)
        assert all(b.param_data is None for b in ddp.buckets)      # dropped again after backward
    finally:
        destroy_grid()


def test_saved_views_do_not_hold_whole_parameters_and_backward_is_exact():
    for overlap in (False, True):
        run_on_ranks(_check, 2, overlap)
