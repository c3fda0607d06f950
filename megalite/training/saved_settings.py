"""What a checkpoint's model was saved with: read for --use-checkpoint-args, and checked on --load so
that weights are never loaded into a model that would compute something else with them."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

from megalite.checkpoint.paths import rank_dir
from megalite.checkpoint.reader import CheckpointReader
from megalite.config.flags import flag_name
from megalite.config.settings import ModelConfig, saved_model_fields

__all__ = ["saved_model_settings", "check_saved_model", "checkpoint_model_defaults", "SAME_SHAPE_MATH"]


def saved_model_settings(root: str) -> Dict[str, Any]:
    """The model fields a checkpoint was saved with (its layout fields dropped: a run has its own)."""
    reader = CheckpointReader(root)
    relative = os.path.relpath(rank_dir(root, reader.iteration, 0, 0), reader.folder)
    settings = reader.load(os.path.join(relative, "model_optim_rng.pt"), mmap=True).get("settings") or {}
    return saved_model_fields(settings.get("model", {}))


# Fields that change what the weights compute without changing any tensor's shape: loading weights
# trained under other values would give no error and another model.
SAME_SHAPE_MATH = ("normalization", "norm_epsilon", "apply_layernorm_1p", "openai_gelu", "position_embedding_type",
                   "rotary_base", "rotary_percent", "use_rope_scaling", "rope_scaling_factor",
                   "rotary_seq_len_interpolation_factor")


def check_saved_model(root: str, model: ModelConfig) -> None:
    """Refuse to load weights saved under other values of :data:`SAME_SHAPE_MATH` (one line; fields a
    checkpoint did not save, from before they existed, are taken as agreeing)."""
    saved = saved_model_settings(root)
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name in SAME_SHAPE_MATH:
        if name in saved and saved[name] != getattr(model, name):
            flag = flag_name(fields[name])
            raise ValueError(f"--load {root} was trained with {flag} {saved[name]!r}, this run has "
                             f"{getattr(model, name)!r}: the weights would compute another model; give {flag} "
                             f"{saved[name]!r} (or --use-checkpoint-args)")


def checkpoint_model_defaults(root: str) -> Dict[str, Any]:
    """--use-checkpoint-args: the model flags a checkpoint was saved with, as parser defaults."""
    model = saved_model_settings(root)
    if model.get("num_query_groups") == model.get("num_attention_heads"):
        model.pop("num_query_groups", None)        # one group per head: the default, not a GQA flag
    elif model.get("num_query_groups") is not None:
        model["group_query_attention"] = True
    return model
