"""tools/planner_ablation.py: each column changes what its name says, and a run without the effect prints "-"."""
import dataclasses

import pytest

from megalite.scaling.compare import ratio
from megalite.scaling.hardware import PRESETS
from megalite.scaling.published import later_runs
from tools import planner_ablation as ablation


def test_each_change_turns_back_one_effect():
    changes = {name: (flags, alter) for name, flags, alter in ablation.CHANGES}
    llama_128k = next(run for run in later_runs() if "128K" in run.name)
    readme_70b = next(run for run in later_runs() if run.name == "Megatron H100 70B")
    ring = changes["CP ring"][0](list(llama_128k.flags))
    assert "--cp-comm-type" not in ring and len(ring) == len(llama_128k.flags) - 2
    assert changes["CP ring"][0](list(readme_70b.flags)) is None
    assert ablation.ratio(readme_70b, None, PRESETS["h100-sxm"]) == "-"
    off = changes["overlaps off"][0](list(readme_70b.flags))
    assert not set(ablation.OVERLAPS) & set(off) and off[-1] == "--no-overlap-p2p-communication"
    assert changes["unfused attention"][0]([])[-2:] == ["--attention-backend", "unfused"]
    assert changes["cuDNN attention"][0](list(llama_128k.flags))[-2:] == ["--attention-backend", "auto"]
    assert changes["cuDNN attention"][0](list(readme_70b.flags)) is None
    h100 = PRESETS["h100-sxm"]
    assert changes["sustained 1"][1](h100) == dataclasses.replace(h100, sustained_fraction=1.0)
    assert changes["no SM share"][1](h100).overlap_sm_fraction == 0.0


def test_a_row_is_the_validated_ratio_then_each_change():
    # Mixtral (its sizes given: one plan per cell): the first cell is validate's ratio; "sustained 1" is the
    # same run at the kernel figures alone, faster; no context parallelism, so no CP-ring cell.
    run = next(run for run in later_runs() if run.name.startswith("Mixtral"))
    cells = ablation.row(run)
    assert float(cells[0]) == pytest.approx(ratio(run), abs=0.005)
    names = [name for name, _flags, _alter in ablation.CHANGES]
    assert float(cells[1 + names.index("sustained 1")]) > float(cells[0])
    assert cells[1 + names.index("CP ring")] == "-"
