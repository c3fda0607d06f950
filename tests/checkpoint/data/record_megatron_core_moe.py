"""Records what megatron-core itself holds for the MoE test model (tests/checkpoint/test_megatron_core_moe.py's
moe_hand_args: local spec, SequentialMLP experts), so that tests without megatron-core can check megalite's
MoE exports key by key and shape by shape: at EP1, EP2 and TP2 x EP2 (expert TP 1), and at EP2 with every
linear's bias (``moe_hand_args(bias=True)``), the state_dict of every
rank that Megatron-LM's legacy save writes (expert-data-parallel rank 0), under the folder name that
Megatron-LM's own get_checkpoint_name gives it.  Run from the repository root with megatron-core and
Megatron-LM's megatron/training (tag core_v0.16.1) installed:

    python -m tests.checkpoint.data.record_megatron_core_moe   (writes megatron_core_moe_keys.json beside it)
"""
import datetime
import json
import os
import sys
import types

import torch

from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_megatron_core_moe import mcore_moe_model, moe_hand_args

OUT = os.path.join(os.path.dirname(__file__), "megatron_core_moe_keys.json")
# (TP, EP, every linear with a bias); PP 1; world max(TP, EP)
LAYOUTS = {"ep1": (1, 1, False), "ep2": (1, 2, False), "tp2ep2": (2, 2, False), "ep2-bias": (1, 2, True)}


def _record(rank, world_size, tp, ep, bias):
    from megatron.core import parallel_state
    # Megatron-LM's training package imports a Triton kernel module at import time; none on a CPU machine.
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *args, **kwargs: None
    sys.modules[stub.__name__] = stub
    from megatron.training.checkpointing import get_checkpoint_name
    model = mcore_moe_model(moe_hand_args(tp, 1, ep, bias), tp, 1, ep)
    if parallel_state.get_expert_data_parallel_rank() != 0:
        return None                                       # Megatron-LM's legacy save skips this rank
    folder = os.path.basename(os.path.dirname(get_checkpoint_name("/ckpt", 1)))
    return folder, {name: (None if not isinstance(value, torch.Tensor) else list(value.shape))
                    for name, value in model.state_dict().items()}


def main():
    import megatron.core
    record = {"source": f"megatron-core {megatron.core.__version__} (PyPI wheel) with Megatron-LM's "
                        "megatron/training at tag core_v0.16.1: GPTModel with get_gpt_decoder_block_spec (local, "
                        "SequentialMLP), built on CPU over gloo by tests/checkpoint/data/record_megatron_core_moe.py; "
                        "the folder names by megatron.training.checkpointing.get_checkpoint_name",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "args": {k: v for k, v in vars(moe_hand_args()).items()}, "layouts": {}}
    for layout, (tp, ep, bias) in LAYOUTS.items():
        results = run_on_ranks(_record, max(tp, ep), tp, ep, bias, timeout=300)
        record["layouts"][layout] = {"tp": tp, "ep": ep, "bias": bias,
                                     "files": dict(r for r in results if r is not None)}
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
