#!/usr/bin/env python
"""The published large runs as megalite flags: Narayanan et al. 2021 Table 1, Korthikanti et al. 2022 Table 3.

    python examples/scaling/runs.py --list              # name, GPUs, nodes of 8
    python examples/scaling/runs.py narayanan-145.6b    # GPUS=... on the first line, then the flags

The rows and their flags live in megalite/scaling/published.py (the validation uses the same):
fp16, full recompute and the interleaved schedule for Table 1, sequence parallelism and selective
recompute for Table 3.  launch_torchrun.sh reads this output.
"""
import shlex
import sys

from megalite.scaling.published import KORTHIKANTI_TABLE_3, NARAYANAN_TABLE_1, korthikanti_flags, narayanan_flags


def runs():
    """name -> (GPUs, flags)."""
    table = {f"narayanan-{row.params_billion:g}b": (row.gpus, narayanan_flags(row)) for row in NARAYANAN_TABLE_1}
    table.update({f"korthikanti-{row.name.lower()}": (row.gpus, korthikanti_flags(row)) for row in KORTHIKANTI_TABLE_3})
    return table


def main(argv):
    table = runs()
    if argv == ["--list"]:
        for name, (gpus, _flags) in table.items():
            print(f"{name:<22} {gpus:>5} GPUs  {max(1, gpus // 8):>4} nodes of 8")
        return 0
    if len(argv) != 1 or argv[0] not in table:
        print(f"runs.py: error: give one of {', '.join(table)} (or --list)", file=sys.stderr)
        return 2
    gpus, flags = table[argv[0]]
    print(f"GPUS={gpus}")
    print(shlex.join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
