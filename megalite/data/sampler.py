"""Which samples each data-parallel rank reads, in Megatron's MegatronPretrainingSampler order."""
from __future__ import annotations


class PretrainingSampler:
    """Yields this DP rank's micro-batches of sample indices, resumable from ``consumed_samples``.

    The global order is 0, 1, 2, ...: each step takes the next micro_batch_size * dp_size samples
    and DP rank r gets the r-th slice of micro_batch_size of them.  A trailing incomplete step is
    dropped, so all ranks always run the same number of micro-batches.  Example (mbs 2, dp 2):
    rank 0 reads [0, 1], [4, 5], ...; rank 1 reads [2, 3], [6, 7], ...
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        if total_samples <= 0:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:   # equal: a finished run resumed, nothing left to read
            raise ValueError(f"consumed_samples {consumed_samples} is past the {total_samples} samples of the "
                             f"dataset; build the dataset with more samples (train iterations)")
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro_batch_size {micro_batch_size}, dp_rank {dp_rank}, "
                             f"dp_size {dp_size}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self):
        step = self.micro_batch_size * self.dp_size
        mine = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + mine, start + mine + self.micro_batch_size))
