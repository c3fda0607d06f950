"""Concatenate .bin/.idx datasets into one, in the order given.

    python tools/merge_datasets.py --input data/part1 data/part2 --output-prefix data/all
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all   # every prefix in a folder

All inputs must share a token dtype (the same tokenizer).  The output is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os

from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder, bin_path_of, check_dataset_exists, idx_path_of


def expand_inputs(inputs) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n[:-4]) for n in os.listdir(item) if n.endswith(".idx"))
            if not found:
                raise FileNotFoundError(f"--input folder {item} holds no .idx files")
            prefixes += found
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def merge(prefixes, output_prefix: str) -> IndexedDataset:
    for prefix in prefixes:
        check_dataset_exists(prefix)
    dtype = IndexedDataset(prefixes[0]).dtype
    temporary = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        builder = IndexedDatasetBuilder(bin_path_of(temporary), dtype)
        for prefix in prefixes:
            builder.add_index(prefix)  # refuses a dataset of another dtype, naming it
        builder.finalize(idx_path_of(temporary))
        os.replace(bin_path_of(temporary), bin_path_of(output_prefix))
        os.replace(idx_path_of(temporary), idx_path_of(output_prefix))
    finally:
        for path in (bin_path_of(temporary), idx_path_of(temporary)):
            if os.path.exists(path):
                os.remove(path)
    return IndexedDataset(output_prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes and/or folders of them")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        prefixes = expand_inputs(args.input)
        merged = merge(prefixes, args.output_prefix)
    except (OSError, ValueError) as error:
        parser.exit(2, f"merge_datasets: error: {error}\n")
    print(f"[merge] {len(prefixes)} datasets -> {args.output_prefix}: {merged.num_documents} documents, "
          f"{int(merged.sequence_lengths.sum()):,} tokens")


if __name__ == "__main__":
    main()
