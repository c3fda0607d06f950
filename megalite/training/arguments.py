"""The Megatron-style command line, generated from the config fields (``megalite/config/settings.py``).

Every field declared with ``flags.flag`` becomes one flag: its name, type, choices (from a
``Literal``), default and help sentence all come from the field, so nothing about a flag is
written twice.  :func:`parse_args` fills the five configs and then checks, once, the rules that
span two of them (:func:`validate_together`).

``--config run.yaml`` reads flags from a YAML mapping whose keys are flag names (``seq-length``
or ``seq_length``); flags on the command line override the file.  :func:`resolved_config` is the
inverse: the settings a run ended up with, as a mapping the same option reads back.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import MISSING, asdict, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, get_args, get_type_hints

import yaml

from megalite.config.flags import FieldParser, choices, flag_name
from megalite.config.megatron_switches import add_switches, check_switches, switch_dests
from megalite.config.moe_settings import check_expert_layout
from megalite.config.settings import (
    CONFIG_CLASSES,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    check_batch_sizes,
)
from megalite.parallel.cp_attention import check_a2a_heads
from megalite.parallel.pipeline.orders import check_schedule, default_schedule
from megalite.parallel.pipeline.stages import virtual_stage_layer_counts
from megalite.training.batch_schedule import run_batch_schedule
from megalite.training.saved_settings import checkpoint_model_defaults

__all__ = ["build_parser", "parse_args", "validate_together", "check_context_parallel", "resolved_config"]

Configs = Tuple[ModelConfig, ParallelConfig, OptimizerConfig, DataConfig, TrainingConfig]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of exiting, so callers (and tests) decide how to report."""

    def error(self, message):
        raise ValueError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Help sentence, then the default when there is one ("default X" is said in the sentence otherwise)."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help
        return f"{action.help} (default: %(default)s)"


def _scalar_type(annotation):
    """int, float or str for ``X``, ``Optional[X]``, ``Literal[...]`` or ``List[X]`` annotations."""
    allowed = choices(annotation)
    if allowed is not None:
        return type(allowed[0])
    if annotation in (int, float, str, bool):
        return annotation
    return _scalar_type(next(a for a in get_args(annotation) if a is not type(None)))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pretrain_gpt.py", description="Train a GPT with megalite (Megatron-LM flags).",
                            formatter_class=_HelpFormatter)
    seen = {}
    for cls in CONFIG_CLASSES:
        group = parser.add_argument_group(cls.__name__, cls.__doc__)
        hints = get_type_hints(cls)
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            if f.name in seen:
                raise RuntimeError(f"field {f.name} is in both {seen[f.name]} and {cls.__name__}")
            seen[f.name] = cls.__name__
            kind = _scalar_type(hints[f.name])
            kwargs = dict(dest=f.name, help=f.metadata["help"])
            if f.metadata.get("parse"):   # one value, read by the field's own parser
                kwargs.update(type=FieldParser(f.metadata["parse"], flag_name(f)), default=f.default,
                              metavar=f.name.upper())
            elif kind is bool:
                # A switch turns the field away from its default (--disable-bias-linear sets add_bias_linear False).
                kwargs.update(action="store_false" if f.default else "store_true", default=argparse.SUPPRESS)
            else:
                kwargs.update(type=kind, choices=choices(hints[f.name]), default=f.default)
                if get_args(hints[f.name]) and List[kind] in get_args(hints[f.name]):
                    kwargs["nargs"] = "+"
            group.add_argument(flag_name(f), **kwargs)
    # A switch Megatron has that only gates another flag: --num-query-groups counts only with it.
    parser.add_argument("--group-query-attention", action="store_true",
                        help="use --num-query-groups key/value groups (grouped-query attention)")
    add_switches(parser)
    parser.add_argument("--config", metavar="YAML", help="read flags from this YAML file (keys are flag names); "
                        "the command line overrides it")
    return parser


class _BadKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives one key twice (plain YAML keeps the last) or a key
    that is a list or a mapping (no flag is named so)."""

    def construct_mapping(self, node, deep=False):
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *base`: its keys may be given again here
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (list, dict)):
                raise _BadKey(f"line {line}: a {type(key).__name__} is no flag name; keys are flag names")
            if key in lines:
                raise _BadKey(f"{key!r} is given twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _exactly(kind, value):
    """``value`` as ``kind`` without YAML's silent coercions: true is no number, 2.9 no integer, and a
    mapping, a list, true or null is no text."""
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError
    if kind is int and isinstance(value, float):
        raise ValueError
    if kind is str and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise ValueError
    return kind(value) if kind else value


def yaml_defaults(parser: ArgumentParser, path: str) -> Dict[str, Any]:
    """The flags of a YAML file as parser defaults (so that the command line overrides them)."""
    try:
        with open(path) as f:
            document = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ValueError(f"--config {path}: {error.strerror}") from None
    except _BadKey as error:
        raise ValueError(f"--config {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag names to values, "
                         f"not a {type(document).__name__}")
    actions = {option: action for action in parser._actions for option in action.option_strings}
    defaults, given_as = {}, {}
    for key, value in document.items():
        option = "--" + str(key).replace("_", "-")
        action = actions.get(option)
        if action is None or option in ("--config", "--help"):
            raise ValueError(f"--config {path}: {key!r} is not a flag; see --help for the names")
        if action.dest in given_as:
            raise ValueError(f"--config {path}: {given_as[action.dest]!r} and {key!r} are the same flag; keep one")
        given_as[action.dest] = key
        defaults[action.dest] = _yaml_value(path, key, action, value)
    return defaults


def _yaml_value(path: str, key, action: argparse.Action, value):
    """One flag's value from the YAML file, checked as the command line would check it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} is a switch; give true or false, not {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action.type, FieldParser) and value is not None:
        return action.type.from_config(path, value)
    if value is None:
        if action.default is not None:   # null would reach a field that has no "unset"
            raise ValueError(f"--config {path}: {key} is null; give it a value or remove the key (default "
                             f"{action.default})")
        return None
    values = value if isinstance(value, list) else [value]
    if action.nargs is None and isinstance(value, list):
        raise ValueError(f"--config {path}: {key} takes one value, not a list")
    try:
        values = [_exactly(action.type, v) for v in values]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"--config {path}: {key}: {value!r} is not a valid {action.type.__name__}") from None
    for v in values:
        if action.choices is not None and v not in action.choices:
            allowed = ", ".join(map(str, action.choices))
            raise ValueError(f"--config {path}: {key}: {v!r} is not one of {allowed}")
    return values if action.nargs is not None else values[0]


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> Configs:
    """Parse Megatron-style flags into ``(model, parallel, optimizer, data, training)`` configs.

    Raises ValueError (one line, naming the flag and the fix) on a bad value or combination.
    ``world_size`` defaults to $WORLD_SIZE (set by torchrun) or 1.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    if known.config is not None:
        parser.set_defaults(**yaml_defaults(parser, known.config))
        known = parser.parse_known_args(argv)[0]     # --load and --use-checkpoint-args may come from the file
    if getattr(known, "use_checkpoint_args", False) and known.load is not None:
        parser.set_defaults(**checkpoint_model_defaults(known.load))
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    check_switches(namespace)
    for dest in switch_dests():   # accepted or refused above; no config holds them
        namespace.pop(dest)
    gqa = namespace.pop("group_query_attention", False)
    # Only what the command line gave (or a field's own default) reaches the dataclasses.
    given = {k: v for k, v in namespace.items() if v is not MISSING}
    if gqa and given.get("num_query_groups") is None:
        raise ValueError("--group-query-attention needs --num-query-groups N")
    if not gqa and given.get("num_query_groups") is not None:
        raise ValueError(f"--num-query-groups {given['num_query_groups']} takes effect only with "
                         f"--group-query-attention (as in Megatron-LM); add that flag")

    def pick(cls, **extra):
        names = {f.name for f in fields(cls)} - set(extra)
        return cls(**{k: v for k, v in given.items() if k in names}, **extra)

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = pick(ParallelConfig, world_size=world_size)
    model = pick(ModelConfig)
    configs = (model, parallel, pick(OptimizerConfig), pick(DataConfig), pick(TrainingConfig))
    validate_together(*configs)
    return configs


def validate_together(model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig,
                      data: DataConfig, training: TrainingConfig) -> None:
    """The rules that span configs, each checked here once; fills the defaults that depend on another config."""
    model.check_tensor_parallel(parallel.tensor_model_parallel_size, parallel.sequence_parallel)
    dp = parallel.data_parallel_size
    if training.global_batch_size is None:
        training.global_batch_size = training.micro_batch_size * dp
    batches = run_batch_schedule(training, model.seq_length, dp)
    check_batch_sizes(training.global_batch_size, training.micro_batch_size, dp)
    if training.train_samples is not None:
        training.train_iters = batches.num_iterations(training.train_samples)
    check_context_parallel(model, parallel)
    check_expert_layout(model, parallel, training)
    pp = parallel.pipeline_model_parallel_size
    per_virtual = parallel.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        if model.num_layers % (pp * per_virtual):
            raise ValueError(f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size "
                             f"{pp} x --num-layers-per-virtual-pipeline-stage {per_virtual}")
        parallel.virtual_pipeline_model_parallel_size = model.num_layers // (pp * per_virtual)
        parallel.num_layers_per_virtual_pipeline_stage = None
        parallel.check_virtual_pipeline()
    vpp = parallel.virtual_pipeline_model_parallel_size
    try:
        virtual_stage_layer_counts(model.num_layers, pp, vpp, parallel.decoder_first_pipeline_num_layers,
                                   parallel.decoder_last_pipeline_num_layers)
    except ValueError as error:
        raise ValueError(f"--num-layers {model.num_layers} on --pipeline-model-parallel-size {pp}, virtual size "
                         f"{vpp or 1}{_given(parallel, 'decoder_first_pipeline_num_layers')}"
                         f"{_given(parallel, 'decoder_last_pipeline_num_layers')}: {error}") from None
    schedule = parallel.pipeline_schedule or default_schedule(pp, vpp)
    if schedule is not None and pp > 1:
        try:
            check_schedule(schedule, pp, vpp)
        except ValueError as error:
            raise ValueError(f"--pipeline-schedule {schedule} with --virtual-pipeline-model-parallel-size "
                             f"{vpp or 1}: {error}") from None
    if data.data_path and not data.mock_data and data.tokenizer_type is None:
        raise ValueError("--data-path needs --tokenizer-type (and its files) so the vocabulary size is known")
    if training.compile and model.recompute_granularity is not None:
        check_compile_with_recompute(model.recompute_granularity)
    check_zero3_composes(parallel, optimizer, training, schedule)


def check_zero3_composes(parallel: ParallelConfig, optimizer: OptimizerConfig, training: TrainingConfig,
                         schedule: Optional[str]) -> None:
    """ZeRO-3 gathers a unit's parameters for its forward and again for its backward, and drops them when
    that backward ends (parallel/param_gather.py).  Refused: what reads them outside those windows (zero-bubble's
    deferred weight gradients) or cannot take the parameters swapped under it (torch.compile's saved tensors)."""
    if optimizer.sharding_strategy() != "optim_grads_params":
        return
    zero3 = ("--data-parallel-sharding-strategy optim_grads_params" if optimizer.data_parallel_sharding_strategy
             else "--use-torch-fsdp2" if optimizer.use_torch_fsdp2 else "--use-megatron-fsdp")
    if schedule == "zb-h1" and parallel.pipeline_model_parallel_size > 1:
        raise ValueError(f"--pipeline-schedule zb-h1 with {zero3} (ZeRO-3): zero-bubble computes weight gradients "
                         f"after the backward that gathers the parameters; use --pipeline-schedule 1f1b, or "
                         f"--data-parallel-sharding-strategy optim_grads")
    if training.compile:
        raise ValueError(f"--compile with {zero3} (ZeRO-3): the compiled layers' backward takes the parameters "
                         f"gathered again for it as modified in place and fails; drop --compile, or use "
                         f"--data-parallel-sharding-strategy optim_grads")


# The first torch where --compile with recompute was verified (tests/model/test_compile.py); torch
# 2.4.1's compiler fails on it (it meets the RNG state recompute saves as a real tensor while tracing).
COMPILE_WITH_RECOMPUTE_FROM = (2, 13)


def check_compile_with_recompute(granularity: str) -> None:
    import torch
    from torch.torch_version import TorchVersion
    if TorchVersion(torch.__version__) < COMPILE_WITH_RECOMPUTE_FROM:
        raise ValueError(f"--compile with --recompute-granularity {granularity} is verified from torch "
                         f"{'.'.join(map(str, COMPILE_WITH_RECOMPUTE_FROM))} on (torch 2.4's compiler fails on it); "
                         f"this is torch {torch.__version__}: drop --compile or the recompute, or upgrade torch")


def check_context_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Each sequence is cut into 2 x CP chunks (parallel/context_parallel.py), and under sequence
    parallelism each CP rank's s/CP tokens are cut again over TP."""
    cp, tp, seq = parallel.context_parallel_size, parallel.tensor_model_parallel_size, model.seq_length
    if cp == 1:
        return
    if parallel.cp_comm_type == "a2a":
        groups = model.num_query_groups or model.num_attention_heads
        check_a2a_heads(model.num_attention_heads // tp, groups // tp, cp)
    if seq % (2 * cp):
        raise ValueError(f"--context-parallel-size {cp} cuts each sequence into 2 x {cp} chunks (two per rank, so "
                         f"causal attention is balanced): --seq-length {seq} is not divisible by {2 * cp}; use a "
                         f"multiple of {2 * cp}")
    if parallel.sequence_parallel and (seq // cp) % tp:
        raise ValueError(f"--sequence-parallel with --context-parallel-size {cp} splits each CP rank's {seq // cp} "
                         f"tokens over --tensor-model-parallel-size {tp}: use a --seq-length divisible by "
                         f"{math.lcm(2 * cp, cp * tp)}")


def _given(config, name: str) -> str:
    value = getattr(config, name)
    field_ = next(f for f in fields(config) if f.name == name)
    return "" if value is None else f", {flag_name(field_)} {value}"



def check_machine(parallel: ParallelConfig, train: TrainingConfig) -> None:
    """Refuse, before the ranks meet, what this machine cannot do (planning elsewhere may still ask for it)."""
    import torch
    if torch.cuda.is_available():
        return
    if parallel.distributed_backend == "nccl":
        raise ValueError("--distributed-backend nccl needs CUDA GPUs and this machine has none; use "
                         "--distributed-backend gloo, or leave the flag out (gloo on CPUs)")
    if train.profile and not train.use_pytorch_profiler:
        raise ValueError("--profile alone is Megatron's nsys capture (the CUDA profiler API) and this machine has no "
                         "CUDA; add --use-pytorch-profiler for a torch.profiler trace")


def check_output_folders(train: TrainingConfig) -> None:
    """Refuse, before any work, an output folder the run could not write: --save or --tensorboard-dir naming
    a file, or a place on a read-only file system or without write permission (checked, not written)."""
    for flag_, value, folder in (("--save", train.save, train.save),
                                 ("--tensorboard-dir", train.tensorboard_dir, train.tensorboard_dir),
                                 ("--log-json", train.log_json,
                                  os.path.dirname(os.path.abspath(train.log_json)) if train.log_json else None)):
        if folder is None:
            continue
        if flag_ == "--log-json" and os.path.isdir(value):
            raise ValueError(f"--log-json {value} is a folder; name the file to write the records to")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{flag_} {value}: {folder} is a file, not a folder; name a folder")
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{flag_} {value}: {existing} cannot be written (a read-only file system, a file in "
                             f"the way, or no permission); choose a writable folder")


def resolved_config(configs: Sequence[Any]) -> Dict[str, Any]:
    """Every flag's value in a run's configs (derived defaults filled in), as ``--config`` reads it."""
    parser = build_parser()
    dests = {action.dest: action for action in parser._actions if action.option_strings}
    resolved = {}
    for config in configs:
        for name, value in asdict(config).items():
            action = dests.get(name)
            if action is None:
                continue  # not a flag (the world size)
            key = action.option_strings[0][2:].replace("-", "_")
            resolved[key] = (not value) if isinstance(action, argparse._StoreFalseAction) else value
    # What would read back as a contradiction: the iteration count derived from --train-samples,
    # and query groups that are only a flag together with the switch that enables them.
    if resolved.get("train_samples") is not None:
        resolved.pop("train_iters")
    if resolved["num_query_groups"] == resolved["num_attention_heads"]:
        resolved.pop("num_query_groups")
    else:
        resolved["group_query_attention"] = True
    return resolved
