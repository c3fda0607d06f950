"""Choosing a layout: predictions over the settings a run leaves open, the best one that fits.

``plan(argv, hardware, world_size)`` predicts the trainer flags ``argv``; when ``argv`` leaves out the
micro-batch size (with a global batch given) or the virtual pipeline size (with pipeline stages),
each is chosen among the values that parse, split and
fit (micro-batch 1, 2, 4, 8, 16; virtual sizes that divide a stage's layers) for the highest model
TFLOP/s per GPU (ties: less memory).  ``search`` enumerates whole layouts -- TP (a power of two within
a node) x PP x DP x micro-batch x recompute x virtual size -- and says why each rejected one fails.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megalite.arguments import parse_args
from megalite.scaling.hardware import Hardware
from megalite.scaling.predict import Prediction, predict

__all__ = ["Candidate", "with_flags", "given", "predict_argv", "plan", "search", "describe", "MICRO_BATCHES"]

MICRO_BATCHES = (1, 2, 4, 8, 16)
MAX_VIRTUAL = 8


@dataclass
class Candidate:
    flags: Dict[str, object]                 # the flags this candidate sets (name -> value; None = dropped)
    prediction: Optional[Prediction] = None
    reason: str = ""                         # why it was rejected ("" when it fits)
    chosen: List[str] = field(default_factory=list)


def given(argv: Sequence[str], name: str) -> bool:
    """Whether flag ``name`` (e.g. ``--micro-batch-size``) is on the command line."""
    return any(a == name or a.startswith(name + "=") for a in argv)


def with_flags(argv: Sequence[str], flags: Dict[str, object]) -> List[str]:
    """``argv`` with each flag of ``flags`` replaced: a value, True (a switch), or None (removed)."""
    out, skip = [], False
    names = set(flags)
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            nxt = argv[index + 1] if index + 1 < len(argv) else None
            skip = "=" not in arg and nxt is not None and not nxt.startswith("--")
            continue
        out.append(arg)
    for name, value in flags.items():
        if value is True:
            out.append(name)
        elif value is not None and value is not False:
            out += [name, str(value)]
    return out


def predict_argv(argv: Sequence[str], hardware: Hardware, world_size: int) -> Prediction:
    """Parse trainer flags as ``megalite-train`` does (``--mock-data`` when no data is named) and predict."""
    argv = list(argv)
    if not given(argv, "--mock-data") and not given(argv, "--data-path"):
        argv.append("--mock-data")
    model, parallel, optimizer, _data, training = parse_args(argv, world_size=world_size)
    return predict(model, parallel, training, optimizer, hardware, world_size)


def _try(argv: Sequence[str], flags: Dict[str, object], hardware: Hardware, world_size: int) -> Candidate:
    candidate = Candidate(flags)
    try:
        candidate.prediction = predict_argv(with_flags(argv, flags), hardware, world_size)
    except ValueError as error:
        candidate.reason = str(error).splitlines()[0]
        return candidate
    if not candidate.prediction.fits:
        candidate.reason = (f"needs {candidate.prediction.memory_gb_per_gpu:.1f} GiB per GPU, more than the "
                            f"{hardware.hbm_gb:g} GiB of {hardware.name}")
    return candidate


def _best(candidates: List[Candidate]) -> Optional[Candidate]:
    fitting = [c for c in candidates if not c.reason]
    if not fitting:
        return None
    return max(fitting, key=lambda c: (round(c.prediction.tflops_per_gpu, 9), -c.prediction.memory_gb_per_gpu))


def _virtual_sizes(layers: int, pp: int) -> List[Optional[int]]:
    if pp <= 1 or layers % pp:
        return [None]
    per_stage = layers // pp
    return [None] + [v for v in range(2, min(per_stage, MAX_VIRTUAL) + 1) if per_stage % v == 0]


def plan(argv: Sequence[str], hardware: Hardware, world_size: int) -> Candidate:
    """The prediction of ``argv``, choosing the micro-batch and virtual pipeline sizes it leaves out.

    Raises ValueError (one line) when the flags are invalid or nothing fits.
    """
    argv = list(argv)
    layers = _flag_value(argv, "--num-layers", 2)
    pp = _flag_value(argv, "--pipeline-model-parallel-size", 1)
    # Without a global batch the micro-batch sets it (micro-batch x DP): then it is not the planner's to choose.
    open_mbs = not given(argv, "--micro-batch-size") and given(argv, "--global-batch-size")
    open_vpp = pp > 1 and not (given(argv, "--virtual-pipeline-model-parallel-size")
                               or given(argv, "--num-layers-per-virtual-pipeline-stage"))
    if not open_mbs and not open_vpp:
        candidate = _try(argv, {}, hardware, world_size)
        if candidate.prediction is None:
            raise ValueError(candidate.reason)
        return candidate
    micro_batches = MICRO_BATCHES if open_mbs else [None]
    virtual = _virtual_sizes(layers, pp) if open_vpp else ["given"]
    candidates = []
    for mbs, vpp in itertools.product(micro_batches, virtual):
        flags: Dict[str, object] = {}
        if mbs is not None:
            flags["--micro-batch-size"] = mbs
        if vpp != "given":
            flags["--virtual-pipeline-model-parallel-size"] = vpp
        candidates.append(_try(argv, flags, hardware, world_size))
    best = _best(candidates)
    if best is None:
        reasons = sorted({c.reason for c in candidates})
        raise ValueError(f"no micro-batch / virtual pipeline size fits: {reasons[0]}")
    best.chosen = [name for name, is_open in (("micro_batch_size", open_mbs),
                                              ("virtual_pipeline_model_parallel_size", open_vpp)) if is_open]
    return best


def _flag_value(argv: Sequence[str], name: str, default: int) -> int:
    for index, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return int(arg.split("=", 1)[1])
        if arg == name and index + 1 < len(argv):
            try:
                return int(argv[index + 1])
            except ValueError:
                raise ValueError(f"{name} {argv[index + 1]!r} is not an integer") from None
    return default


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(argv: Sequence[str], hardware: Hardware, world_size: int) -> List[Candidate]:
    """Every layout of the model in ``argv`` on ``world_size`` devices: fitting ones first, ranked by
    model TFLOP/s per GPU, then the rejected ones with their reason."""
    layers = _flag_value(argv, "--num-layers", 2)
    tp_sizes = [t for t in _divisors(hardware.gpus_per_node) if t & (t - 1) == 0 and world_size % t == 0]
    candidates = []
    for tp in tp_sizes:
        for pp in _divisors(layers):
            if world_size % (tp * pp):
                continue
            for mbs, recompute, vpp in itertools.product(MICRO_BATCHES, (None, "selective", "full"),
                                                         _virtual_sizes(layers, pp)):
                flags = {"--tensor-model-parallel-size": tp, "--pipeline-model-parallel-size": pp,
                         "--micro-batch-size": mbs, "--virtual-pipeline-model-parallel-size": vpp,
                         "--num-layers-per-virtual-pipeline-stage": None, "--pipeline-schedule": None,
                         "--recompute-granularity": recompute,
                         "--recompute-method": "uniform" if recompute == "full" else None,
                         "--recompute-num-layers": None, "--checkpoint-activations": None}
                candidates.append(_try(argv, flags, hardware, world_size))
    fitting = sorted((c for c in candidates if not c.reason), key=lambda c: -c.prediction.tflops_per_gpu)
    return fitting + [c for c in candidates if c.reason]


def describe(candidate: Candidate) -> str:
    """TP x PP x DP, micro-batch, virtual size and recompute of a candidate, in one short string."""
    if candidate.prediction is not None:
        layout = candidate.prediction.layout
        return (f"TP{layout['tp']} PP{layout['pp']} DP{layout['dp']} mbs{layout['micro_batch_size']} "
                f"vpp{layout['vpp']} recompute={layout['recompute'] or 'none'}")
    flags = candidate.flags
    return (f"TP{flags.get('--tensor-model-parallel-size')} PP{flags.get('--pipeline-model-parallel-size')} "
            f"mbs{flags.get('--micro-batch-size')} vpp{flags.get('--virtual-pipeline-model-parallel-size') or 1} "
            f"recompute={flags.get('--recompute-granularity') or 'none'}")

