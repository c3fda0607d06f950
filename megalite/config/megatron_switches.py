"""Megatron-LM's flags that only choose Megatron's own implementation, and the FP8 ones megalite refuses.

Megatron's scripts pass switches that pick one of its kernels, model classes or file formats
(``--use-mcore-models``, ``--no-rope-fusion``, ``--ckpt-format torch_dist``).  They change how Megatron
computes, not what is computed, and megalite has one implementation of each thing, so it accepts them
and says, in :data:`ACCEPTED`, what it does instead.  That table is the one list: the parser adds these
flags from it, and ``docs/megatron_flags.md`` shows it (``tests/config/test_megatron_switches.py``
checks the page against it).  A few such flags are declared on config fields because megalite reads
them (``--attention-backend``, ``--use-flash-attn``, ``--data-impl``); they are in the table too, marked
``on_field``.

FP8 (and the flags that exist only for TransformerEngine) is not an implementation choice: it changes
the numbers.  Those flags are refused with one line (:data:`REFUSED`).  Any other unknown flag stays an
error of the parser.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

__all__ = ["Switch", "ACCEPTED", "REFUSED", "FP8_NEEDS_TE", "refusal_reason", "add_switches", "check_switches",
           "switch_dests",
           "table_markdown"]


@dataclass(frozen=True)
class Switch:
    """``flag``: Megatron's spelling; ``choices``: the values it takes (None: a switch without a value, unless
    ``value_type`` says it takes any value of that type); ``instead``: what megalite does; ``requires``: the
    flags Megatron requires with it (config field names, or the flag of another switch of this table);
    ``on_field``: declared on a config field, not by this table."""

    flag: str
    instead: str
    choices: Optional[Tuple[str, ...]] = None
    requires: Tuple[str, ...] = ()
    on_field: bool = False
    value_type: Optional[type] = None

    @property
    def dest(self) -> str:
        return _switch_dest(self.flag)


def _switch_dest(flag: str) -> str:
    return "megatron_switch_" + flag[2:].replace("-", "_")


def _required_dest(name: str) -> str:
    """Where the parsed flags hold a required flag: a config field, or another switch (named by its flag)."""
    return _switch_dest(name) if name.startswith("--") else name


def _required_flag(name: str) -> str:
    return name if name.startswith("--") else "--" + name.replace("_", "-")


_ONE_MODEL = "megalite has one GPT/LLaMA model (megalite/model/gpt.py) built from its own parallel layers"
_NO_FUSION = "megalite runs PyTorch's own ops here (no Megatron/apex fused kernel); the math is the same"

ACCEPTED: Tuple[Switch, ...] = (
    Switch("--use-mcore-models", _ONE_MODEL),
    Switch("--use-legacy-models", _ONE_MODEL),
    Switch("--transformer-impl", _ONE_MODEL + "; no TransformerEngine layers",
           choices=("local", "transformer_engine", "inference_optimized")),
    Switch("--attention-backend", "torch's scaled_dot_product_attention, which picks flash or memory-efficient "
           "kernels itself where the device has them", on_field=True),
    Switch("--use-flash-attn", "the same: torch's scaled_dot_product_attention chooses flash attention where it "
           "can", on_field=True),
    Switch("--no-masked-softmax-fusion", "the causal mask is applied inside torch's scaled_dot_product_attention"),
    Switch("--no-bias-gelu-fusion", _NO_FUSION),
    Switch("--no-bias-swiglu-fusion", "SwiGLU runs megalite's own kernel (megalite/ops/swiglu.py) or PyTorch's "
           "silu and mul"),
    Switch("--no-bias-dropout-fusion", _NO_FUSION),
    Switch("--no-rope-fusion", "rotary embeddings are applied by PyTorch ops (megalite/model/rotary.py)"),
    Switch("--no-persist-layer-norm", "norms run megalite's own kernels (megalite/ops/norms.py)"),
    Switch("--no-gradient-accumulation-fusion", "weight gradients are accumulated into the fp32 grad buffer by a "
           "hook (megalite/parallel/data_parallel.py)"),
    Switch("--cross-entropy-loss-fusion", "the vocabulary-parallel cross entropy is megalite's own "
           "(megalite/parallel/layers.py), in fp32"),
    Switch("--cross-entropy-fusion-impl", "the same: megalite's own vocabulary-parallel cross entropy",
           choices=("native", "te")),
    Switch("--no-create-attention-mask-in-dataloader", "megalite never builds an attention mask in the data "
           "loader: attention is causal inside scaled_dot_product_attention"),
    Switch("--data-impl", "megalite reads Megatron's memory-mapped .bin/.idx format", on_field=True),
    Switch("--ckpt-format", "megalite saves Megatron's folder layout with torch.save files plus its tensor index, "
           "which any layout can load (docs/architecture.md, Contracts)",
           choices=("torch", "torch_dist", "torch_dcp", "fsdp_dtensor")),
    Switch("--tiktoken-pattern", "megalite's TikTokenizer takes its split pattern from the tiktoken encoding "
           "named by --tokenizer-model; other tokenizers ignore it, as Megatron's do", choices=("v1", "v2")),
    Switch("--overlap-param-gather", "as in Megatron: under ZeRO-1/2 the updated shards' all-gathers run into the "
           "next forward, each layer waiting for its own; under ZeRO-3 the next layer's parameters are gathered "
           "while this one computes", requires=("use_distributed_optimizer",), on_field=True),
    Switch("--no-check-for-nan-in-loss-and-grad", "megalite checks every step's gradient norm either way: an "
           "inf/nan norm skips an --fp16 step (the loss scaler's signal) and stops a bf16 or fp32 run with one "
           "error line, where Megatron without its check would go on training"),
    Switch("--logging-level", "megalite's messages (the iteration line, warnings, errors) go through its own "
           "`megalite` logger at INFO whatever the value; the level of Python's root logger is left alone",
           value_type=int),
    Switch("--init-model-with-meta-device", "each rank draws its parameters whole from the seed (TP-invariant "
           "initialization) and, under ZeRO-3, keeps only its shard once the buckets are built; the values are "
           "those of a run without the flag, and the whole model passes through memory once, at build"),
    Switch("--use-nccl-ub", "megalite's collectives run on ordinary buffers (no NCCL user-buffer registration); "
           "the same sums"),
    Switch("--fsdp-double-buffer", "under ZeRO-3 each gathered bucket gets a fresh buffer, freed when its unit's "
           "parameters are dropped (megalite/parallel/param_gather.py); no persistent pair of buffers, the same "
           "values"),
    Switch("--fsdp-manual-registration", "no NCCL buffer registration (see --use-nccl-ub)",
           requires=("use_megatron_fsdp", "--use-nccl-ub")),
    Switch("--moe-permute-fusion", "tokens are sorted to their experts and back by PyTorch's argsort, index_select "
           "and index_add (megalite/model/moe/experts.py); the same permutation"),
    Switch("--moe-shared-expert-overlap", "the shared expert runs after the routed experts, not overlapped with "
           "the token dispatch; the output is the same", requires=("moe_shared_expert_intermediate_size",)),
    Switch("--moe-use-legacy-grouped-gemm", "--moe-grouped-gemm has one implementation (torch._grouped_mm where "
           "served, else a loop over the experts)", requires=("moe_grouped_gemm",)),
)

FP8_NEEDS_TE = ("FP8 needs TransformerEngine on a GPU, and megalite has neither FP8 kernels nor "
                "TransformerEngine; drop the FP8 flags and train in --bf16")

# Flags refused, with how many values each takes (so the message names the flag, not a stray value).
REFUSED: Dict[str, int] = {
    "--fp8-format": 1, "--fp8-recipe": 1, "--fp8-margin": 1, "--fp8-interval": 1, "--fp8-amax-history-len": 1,
    "--fp8-amax-compute-algo": 1, "--fp8-param-gather": 0, "--no-fp8-wgrad": 0, "--fp8-param": 0,
    "--first-last-layers-bf16": 0, "--fp4-format": 1, "--fp4-recipe": 1, "--fp4-param-gather": 0,
    "--te-rng-tracker": 0, "--tp-comm-overlap": 0, "--te-precision-config-file": 1,
}
# Why a refused flag is refused, where the reason is not FP8 / TransformerEngine.
REFUSAL_REASONS: Dict[str, str] = {
    "--tp-comm-overlap": "overlapping tensor-parallel communication with the GEMMs is TransformerEngine's "
                         "userbuffers, which megalite does not have; drop the flag (megalite-plan models it)",
}


def refusal_reason(flag: str) -> str:
    return REFUSAL_REASONS.get(flag, FP8_NEEDS_TE)


def _refused_dest(flag: str) -> str:
    return "megatron_refused_" + flag[2:].replace("-", "_")


def add_switches(parser: argparse.ArgumentParser) -> None:
    """Add the accepted switches (those not on a config field) and the refused flags to ``parser``."""
    group = parser.add_argument_group("Megatron-LM implementation switches",
                                      "accepted so Megatron's scripts run; see docs/megatron_flags.md")
    for switch in ACCEPTED:
        if switch.on_field:
            continue
        help_ = f"accepted for Megatron's scripts: {switch.instead}"
        if switch.value_type is not None:
            group.add_argument(switch.flag, dest=switch.dest, type=switch.value_type, default=None, help=help_)
        elif switch.choices is None:
            group.add_argument(switch.flag, dest=switch.dest, action="store_true", help=help_)
        else:
            group.add_argument(switch.flag, dest=switch.dest, choices=switch.choices, default=None, help=help_)
    refused = parser.add_argument_group("FP8 and TransformerEngine", "refused: " + FP8_NEEDS_TE)
    for flag, nargs in REFUSED.items():
        kwargs = {"action": "store_true"} if nargs == 0 else {}
        refused.add_argument(flag, dest=_refused_dest(flag), default=None, help=argparse.SUPPRESS, **kwargs)


def check_switches(namespace: Mapping[str, object]) -> None:
    """Refuse an FP8/TransformerEngine flag, or an accepted switch without the flags Megatron requires
    with it (``namespace``: the parsed flags by destination, config fields included)."""
    for flag in REFUSED:
        if namespace.get(_refused_dest(flag)) not in (None, False):
            raise ValueError(f"{flag}: {refusal_reason(flag)}")
    for switch in ACCEPTED:
        if switch.on_field or namespace.get(switch.dest) in (None, False):
            continue
        missing = [name for name in switch.requires if not namespace.get(_required_dest(name))]
        if missing:
            needed = " and ".join(map(_required_flag, switch.requires))
            raise ValueError(f"{switch.flag} needs {needed} (as in Megatron-LM); add "
                             f"{' '.join(map(_required_flag, missing))}")


def switch_dests() -> Tuple[str, ...]:
    """Every parser destination this module adds (parse_args drops them before filling the configs)."""
    return tuple(s.dest for s in ACCEPTED if not s.on_field) + tuple(_refused_dest(f) for f in REFUSED)


def table_markdown() -> str:
    """:data:`ACCEPTED` and :data:`REFUSED` as the Markdown table of docs/megatron_flags.md
    (``python -m megalite.config.megatron_switches`` prints it)."""
    rows = ["| Megatron-LM flag | values | megalite |", "|---|---|---|"]
    for s in ACCEPTED:
        values = ", ".join(s.choices) if s.choices else f"one {s.value_type.__name__}" if s.value_type else \
            "(switch)" if not s.on_field else "(a config field)"
        needs = f" Needs {' and '.join(map(_required_flag, s.requires))}, as in Megatron." \
            if s.requires else ""
        rows.append(f"| `{s.flag}` | {values} | accepted: {s.instead}.{needs} |")
    for flag, nargs in REFUSED.items():
        rows.append(f"| `{flag}` | {'(switch)' if nargs == 0 else 'one value'} | refused: {refusal_reason(flag)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table_markdown(), end="")
