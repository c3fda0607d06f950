"""The Megatron-style command line, generated from the config fields (``config.py``).

Every field declared with ``config.flag`` becomes one flag: its name, type, choices (from a
``Literal``), default and help sentence all come from the field, so nothing about a flag is
written twice.  :func:`parse_args` fills the five configs and then checks, once, the rules that
span two of them (:func:`validate_together`).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from typing import List, Optional, Sequence, Tuple, get_args, get_type_hints

from megalite.config import (
    CONFIG_CLASSES,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    check_batch_sizes,
    choices,
    flag_name,
)
from megalite.parallel.pipeline.orders import check_schedule, default_schedule
from megalite.parallel.pipeline.stages import virtual_stage_layer_counts

__all__ = ["build_parser", "parse_args", "validate_together"]

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
            if kind is bool:
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
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> Configs:
    """Parse Megatron-style flags into ``(model, parallel, optimizer, data, training)`` configs.

    Raises ValueError (one line, naming the flag and the fix) on a bad value or combination.
    ``world_size`` defaults to $WORLD_SIZE (set by torchrun) or 1.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    gqa = namespace.pop("group_query_attention")
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
    model = pick(ModelConfig, tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                 sequence_parallel=parallel.sequence_parallel)
    configs = (model, parallel, pick(OptimizerConfig), pick(DataConfig), pick(TrainingConfig))
    validate_together(*configs)
    return configs


def validate_together(model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig,
                      data: DataConfig, training: TrainingConfig) -> None:
    """The rules that span configs, each checked here once; fills the defaults that depend on another config."""
    dp = parallel.data_parallel_size
    if training.global_batch_size is None:
        training.global_batch_size = training.micro_batch_size * dp
    check_batch_sizes(training.global_batch_size, training.micro_batch_size, dp)
    if model.tensor_model_parallel_size != parallel.tensor_model_parallel_size or \
            model.sequence_parallel != parallel.sequence_parallel:
        raise ValueError("ModelConfig and ParallelConfig disagree on tensor-model-parallel-size/sequence-parallel")
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


def _given(config, name: str) -> str:
    value = getattr(config, name)
    field_ = next(f for f in fields(config) if f.name == name)
    return "" if value is None else f", {flag_name(field_)} {value}"

