"""Choosing a layout: predictions over the settings a run leaves open, the best one that fits.

``plan(argv, hardware, world_size)`` predicts the trainer flags ``argv``; when ``argv`` leaves out the
micro-batch size (with a global batch given) or the virtual pipeline size (with pipeline stages),
each is chosen among the values that parse, split and
fit (micro-batch 1, 2, 4, 8, 16; virtual sizes that divide a stage's layers) for the highest model
TFLOP/s per GPU (ties: less memory).  ``search`` enumerates whole layouts -- TP (a power of two within
a node) x PP x DP x micro-batch x recompute x virtual size (x EP for experts: each divisor of DP x CP that
divides --num-experts), each with the run's data-parallel sharding or,
when that does not fit and the run leaves the strategy open, the least sharding (ZeRO-1, 2, 3) that does --
and says why each rejected one fails.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megalite.config.settings import ModelConfig
from megalite.scaling.hardware import Hardware
from megalite.scaling.options import PlanOptions, split_plan_flags
from megalite.scaling.pipeline_split import extra_units
from megalite.scaling.predict import GIB, Prediction, layout_of, memory_per_stage, predict
from megalite.training.arguments import build_parser, parse_args, yaml_defaults

__all__ = ["Candidate", "with_flags", "given", "model_of", "predict_argv", "plan", "search", "describe",
           "MICRO_BATCHES"]

MICRO_BATCHES = (1, 2, 4, 8, 16)
MAX_VIRTUAL = 8


@dataclass
class Candidate:
    flags: Dict[str, object]                 # the flags this candidate sets (name -> value; None = dropped)
    prediction: Optional[Prediction] = None
    reason: str = ""                         # why it was rejected ("" when it fits)
    memory_gib: Optional[float] = None       # the most loaded rank's memory, when the flags split
    description: str = ""                    # TP, PP, DP, micro-batch, virtual size, recompute
    chosen: List[str] = field(default_factory=list)


def given(argv: Sequence[str], name: str) -> bool:
    """Whether flag ``name`` (e.g. ``--micro-batch-size``) is on the command line or in its ``--config`` file."""
    return any(a == name or a.startswith(name + "=") for a in argv) or _dest(name) in _config_file(argv)


def _dest(name: str) -> str:
    return name[2:].replace("-", "_")


def _config_file(argv: Sequence[str]) -> Dict[str, object]:
    """The flags of ``--config FILE`` (arguments.yaml_defaults: field name -> value), or {}."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return yaml_defaults(build_parser(), arg.split("=", 1)[1])
        if arg == "--config" and index + 1 < len(argv):
            return yaml_defaults(build_parser(), argv[index + 1])
    return {}


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


def _configs(argv: Sequence[str], world_size: int, options: PlanOptions = PlanOptions()):
    """The trainer's configs of ``argv``.  With the embedding/loss counted in the pipeline split the
    trainer's even-split check is asked about the ``L + 1`` or ``L + 2`` units the split divides
    (pipeline_split.py), and the model keeps its ``L`` layers."""
    argv = list(argv)
    if not given(argv, "--mock-data") and not given(argv, "--data-path"):
        argv.append("--mock-data")
    extra = extra_units(options)
    if extra:
        layers = _flag_value(argv, "--num-layers", 2)
        argv = with_flags(argv, {"--num-layers": layers + extra})
    model, parallel, optimizer, _data, training = parse_args(argv, world_size=world_size)
    if extra:
        model = dataclasses.replace(model, num_layers=model.num_layers - extra)
    return model, parallel, training, optimizer


def model_of(argv: Sequence[str], world_size: int) -> ModelConfig:
    """The model ``argv`` describes (the planner's own flags set aside), as the planner predicts it."""
    options, argv = split_plan_flags(argv)
    return _configs(argv, world_size, options)[0]


def predict_argv(argv: Sequence[str], hardware: Hardware, world_size: int) -> Prediction:
    """Parse trainer flags as ``megalite-train`` does (``--mock-data`` when no data is named), the
    planner's own flags (options.py) beside them, and predict."""
    options, argv = split_plan_flags(argv)
    return predict(*_configs(argv, world_size, options), hardware, world_size, options)


def _try(argv: Sequence[str], flags: Dict[str, object], hardware: Hardware, world_size: int,
         always_predict: bool = False, options: PlanOptions = PlanOptions()) -> Candidate:
    """A candidate's prediction, or why it is rejected; memory is checked first (closed-form in-flight
    counts), so a layout that cannot fit is not simulated unless ``always_predict``."""
    candidate = Candidate(flags)
    try:
        model, parallel, training, optimizer = _configs(with_flags(argv, flags), world_size, options)
        layout = layout_of(parallel, training, optimizer, world_size, options)
        candidate.description = (f"TP{layout.tp} PP{layout.pp} DP{layout.dp} mbs{layout.micro_batch} vpp{layout.v} "
                                 f"recompute={model.recompute_granularity or 'none'}")
        if model.num_experts is not None:
            candidate.description += f" EP{layout.ep}" + (f" ETP{layout.etp}" if layout.etp > 1 else "")
        if flags.get(SHARDING_FLAG):
            candidate.description += f" {flags[SHARDING_FLAG]}"
        candidate.memory_gib = max(s.total for s in memory_per_stage(model, parallel, optimizer, layout,
                                                                         hardware=hardware)) / GIB
        if always_predict or candidate.memory_gib <= hardware.hbm_gb:
            candidate.prediction = predict(model, parallel, training, optimizer, hardware, world_size, options)
            candidate.memory_gib = candidate.prediction.memory_gb_per_gpu
    except ValueError as error:
        candidate.reason = str(error).splitlines()[0]
        return candidate
    if candidate.memory_gib > hardware.hbm_gb:
        candidate.reason = (f"needs {candidate.memory_gib:.1f} GiB per GPU, more than the "
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

    Raises ValueError (one line) when the flags are invalid, or when sizes are left open and none fits;
    a layout given whole is predicted even if it does not fit (``fits`` says so).
    """
    options, argv = split_plan_flags(argv)
    layers = _flag_value(argv, "--num-layers", 2) + extra_units(options)
    pp = _flag_value(argv, "--pipeline-model-parallel-size", 1)
    # Without a global batch the micro-batch sets it (micro-batch x DP): then it is not the planner's to choose.
    open_mbs = not given(argv, "--micro-batch-size") and given(argv, "--global-batch-size")
    open_vpp = pp > 1 and not (given(argv, "--virtual-pipeline-model-parallel-size")
                               or given(argv, "--num-layers-per-virtual-pipeline-stage"))
    if not open_mbs and not open_vpp:   # nothing to choose: the prediction, whether it fits or not
        candidate = _try(argv, {}, hardware, world_size, always_predict=True, options=options)
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
        candidates.append(_try(argv, flags, hardware, world_size, options=options))
    best = _best(candidates)
    if best is None:
        too_big = [c for c in candidates if c.memory_gib is not None]
        if not too_big:   # the flags themselves do not split: the trainer's own message
            raise ValueError(candidates[0].reason)
        smallest = min(too_big, key=lambda c: c.memory_gib)
        raise ValueError(f"no micro-batch / virtual pipeline size fits: the smallest layout ({describe(smallest)}) "
                         f"{smallest.reason}")
    best.chosen = [name for name, is_open in (("micro_batch_size", open_mbs),
                                              ("virtual_pipeline_model_parallel_size", open_vpp)) if is_open]
    return best


def _flag_value(argv: Sequence[str], name: str, default: int) -> int:
    """An integer flag's value: the command line's, else the ``--config`` file's, else ``default``."""
    for index, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return _integer(name, arg.split("=", 1)[1])
        if arg == name and index + 1 < len(argv):
            return _integer(name, argv[index + 1])
    value = _config_file(argv).get(_dest(name))
    return default if value is None else _integer(name, value)


def _integer(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not an integer") from None


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _expert_sizes(experts: int, stage_ranks: int) -> List[Optional[int]]:
    """EP sizes to try: each divisor of the ``TP x CP x DP`` ranks of a stage that divides the experts (the flag
    left out for a dense model; the trainer refuses what does not divide with the run's expert TP)."""
    if not experts:
        return [None]
    return [ep for ep in _divisors(stage_ranks) if experts % ep == 0]


def search(argv: Sequence[str], hardware: Hardware, world_size: int) -> List[Candidate]:
    """Every layout of the model in ``argv`` on ``world_size`` devices: fitting ones first, ranked by
    model TFLOP/s per GPU, then the rejected ones with their reason."""
    options, argv = split_plan_flags(argv)
    layers = _flag_value(argv, "--num-layers", 2) + extra_units(options)
    tp_sizes = [t for t in _divisors(hardware.gpus_per_node) if t & (t - 1) == 0 and world_size % t == 0]
    open_sharding = options.data_parallel_sharding_strategy is None and not any(
        given(argv, name) for name in ("--use-megatron-fsdp", "--use-torch-fsdp2"))
    experts = _flag_value(argv, "--num-experts", 0)
    candidates = []
    for tp in tp_sizes:
        for pp in _divisors(layers):
            if world_size % (tp * pp):
                continue
            for mbs, recompute, vpp, ep in itertools.product(MICRO_BATCHES, (None, "selective", "full"),
                                                             _virtual_sizes(layers, pp),
                                                             _expert_sizes(experts, world_size // pp)):
                flags = {"--tensor-model-parallel-size": tp, "--pipeline-model-parallel-size": pp,
                         "--micro-batch-size": mbs, "--virtual-pipeline-model-parallel-size": vpp,
                         "--num-layers-per-virtual-pipeline-stage": None, "--pipeline-schedule": None,
                         "--recompute-granularity": recompute,
                         "--recompute-method": "uniform" if recompute == "full" else None,
                         "--recompute-num-layers": None, "--checkpoint-activations": None,
                         "--expert-model-parallel-size": ep}
                candidates.append(_try_sharding(argv, flags, hardware, world_size, options, open_sharding))
    fitting = sorted((c for c in candidates if not c.reason), key=lambda c: -c.prediction.tflops_per_gpu)
    return fitting + [c for c in candidates if c.reason]


SHARDING_FLAG = "--data-parallel-sharding-strategy"
STRONGER_SHARDING = ("optim", "optim_grads", "optim_grads_params")   # ZeRO-1, 2, 3


def _try_sharding(argv: Sequence[str], flags: Dict[str, object], hardware: Hardware, world_size: int,
                  options: PlanOptions, open_sharding: bool) -> Candidate:
    """A layout with the run's sharding; if it does not fit for memory and the run leaves the strategy open,
    the first of ZeRO-1, 2, 3 (in that order: each shards more and communicates more) with which it fits."""
    candidate = _try(argv, flags, hardware, world_size, options=options)
    if not open_sharding or candidate.memory_gib is None or not candidate.reason:
        return candidate
    for strategy in STRONGER_SHARDING:
        sharded = _try(argv, {**flags, SHARDING_FLAG: strategy}, hardware, world_size,
                       options=dataclasses.replace(options, data_parallel_sharding_strategy=strategy))
        if not sharded.reason:
            return sharded
    return candidate


def describe(candidate: Candidate) -> str:
    """TP x PP x DP, micro-batch, virtual size and recompute of a candidate, in one short string."""
    if candidate.description:
        return candidate.description
    flags = candidate.flags
    return (f"TP{flags.get('--tensor-model-parallel-size')} PP{flags.get('--pipeline-model-parallel-size')} "
            f"mbs{flags.get('--micro-batch-size')} vpp{flags.get('--virtual-pipeline-model-parallel-size') or 1} "
            f"recompute={flags.get('--recompute-granularity') or 'none'}")

