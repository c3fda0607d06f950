"""--num-workers: micro-batches read by DataLoader worker processes, identical to reading them in-process."""
import os

import torch

from megalite.data.gpt_dataset import MockGPTDataset
from megalite.data.training_data import MicroBatches
from megalite.parallel.testing import run_on_ranks


class _RecordingDataset(MockGPTDataset):
    """Writes the id of the process that reads each sample into ``folder``."""

    def __init__(self, folder, *args):
        super().__init__(*args)
        self.folder = folder

    def __getitem__(self, index):
        with open(os.path.join(self.folder, f"{index}.pid"), "w") as f:
            f.write(str(os.getpid()))
        return super().__getitem__(index)


def _batches(dataset, num_workers, count=5):
    batches = MicroBatches(dataset, 4, 2, dp_rank=1, dp_size=2, device=torch.device("cpu"), num_workers=num_workers)
    return [next(batches) for _ in range(count)]


def test_workers_read_the_same_micro_batches_in_other_processes(tmp_path):
    dataset = _RecordingDataset(str(tmp_path), 64, 16, 40, 3)
    in_process = _batches(dataset, 0)
    assert {int(p.read_text()) for p in tmp_path.glob("*.pid")} == {os.getpid()}
    for p in tmp_path.glob("*.pid"):
        p.unlink()
    by_workers = _batches(dataset, 2)
    readers = {int(p.read_text()) for p in tmp_path.glob("*.pid")}
    assert readers and os.getpid() not in readers
    for a, b in zip(in_process, by_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # DP rank 1 of 2, micro-batch 2, after 4 consumed samples: samples 6, 7, then 10, 11, ...
    assert torch.equal(by_workers[0]["tokens"], torch.stack([torch.from_numpy(dataset[i]["tokens"]) for i in (6, 7)]))


def _losses(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return [r["loss"] for r in pretrain(argv)]


def test_training_with_workers_equals_training_without():
    argv = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length",
            "8", "--max-position-embeddings", "8", "--vocab-size", "64", "--make-vocab-size-divisible-by", "64",
            "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "1", "--eval-interval", "3",
            "--log-interval", "1000"]
    assert run_on_ranks(_losses, 1, argv, timeout=120)[0] == \
        run_on_ranks(_losses, 1, argv + ["--num-workers", "2"], timeout=120)[0]
