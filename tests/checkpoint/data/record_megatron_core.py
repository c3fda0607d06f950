"""Records what megatron-core itself writes for the two test models (GPT-2 and LLaMA-style, the sizes of
tests/checkpoint/conftest.py), so that tests without megatron-core can check megalite's exports key by
key and shape by shape: each rank's state_dict at TP=1 x PP=1 and TP=2 x PP=2 (legacy format), and the
torch_dist keys of dist_checkpointing.save.  Run from the repository root with megatron-core installed:

    python -m tests.checkpoint.data.record_megatron_core   (writes megatron_core_keys.json beside it)
"""
import datetime
import json
import os
import sys
import tempfile

import torch

from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_megatron_core import _hand_args, _mcore_model

OUT = os.path.join(os.path.dirname(__file__), "megatron_core_keys.json")


def _shapes(state):
    return {name: (None if not isinstance(value, torch.Tensor) else list(value.shape)) for name, value in state.items()}


def _record(rank, world_size, family, tp, pp, folder):
    from megatron.core import dist_checkpointing, parallel_state
    model = _mcore_model(_hand_args(family, tp, pp), tp, pp)
    where = [parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()]
    if folder is not None:
        dist_checkpointing.save({"model": model.sharded_state_dict()}, folder)
    return where, _shapes(model.state_dict())


def _dist_keys(folder):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {key: (list(value.size) if isinstance(value, TensorStorageMetadata) else "bytes")
            for key, value in sorted(meta.items())}


def main():
    import megatron.core
    record = {"source": f"megatron-core {megatron.core.__version__} (PyPI wheel), GPTModel with "
                        "get_gpt_layer_local_spec, built on CPU over gloo by "
                        "tests/checkpoint/data/record_megatron_core.py",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "families": {}}
    for family in ("gpt2", "llama"):
        entry = {"args": {k: v for k, v in vars(_hand_args(family, 1, 1)).items()}, "legacy": {}}
        for tp, pp in ((1, 1), (2, 2)):
            with tempfile.TemporaryDirectory() as folder:
                results = run_on_ranks(_record, tp * pp, family, tp, pp, folder if tp == 1 else None, timeout=180)
                if tp == 1:
                    entry["torch_dist"] = _dist_keys(folder)
            entry["legacy"][f"tp{tp}pp{pp}"] = {f"{t}_{p}": shapes for (t, p), shapes in results}
        record["families"][family] = entry
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
