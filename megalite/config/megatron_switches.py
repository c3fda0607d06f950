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
    """``flag``: Megatron's spelling; ``choices``: the values it takes (None: a switch without a value);
    ``instead``: what megalite does; ``requires``: the flags Megatron requires with it (as config field
    names); ``on_field``: declared on a config field, not by this table."""

    flag: str
    instead: str
    choices: Optional[Tuple[str, ...]] = None
    requires: Tuple[str, ...] = ()
    on_field: bool = False

    @property
    def dest(self) -> str:
        return "megatron_switch_" + self.flag[2:].replace("-", "_")


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
        if switch.choices is None:
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
        if switch.on_field or not namespace.get(switch.dest):
            continue
        missing = [name for name in switch.requires if not namespace.get(name)]
        if missing:
            needed = " and ".join("--" + name.replace("_", "-") for name in switch.requires)
            raise ValueError(f"{switch.flag} needs {needed} (as in Megatron-LM); add "
                             f"{' '.join('--' + name.replace('_', '-') for name in missing)}")


def switch_dests() -> Tuple[str, ...]:
    """Every parser destination this module adds (parse_args drops them before filling the configs)."""
    return tuple(s.dest for s in ACCEPTED if not s.on_field) + tuple(_refused_dest(f) for f in REFUSED)


def table_markdown() -> str:
    """:data:`ACCEPTED` and :data:`REFUSED` as the Markdown table of docs/megatron_flags.md
    (``python -m megalite.config.megatron_switches`` prints it)."""
    rows = ["| Megatron-LM flag | values | megalite |", "|---|---|---|"]
    for s in ACCEPTED:
        values = ", ".join(s.choices) if s.choices else "(switch)" if not s.on_field else "(a config field)"
        needs = f" Needs {' and '.join('--' + r.replace('_', '-') for r in s.requires)}, as in Megatron." \
            if s.requires else ""
        rows.append(f"| `{s.flag}` | {values} | accepted: {s.instead}.{needs} |")
    for flag, nargs in REFUSED.items():
        rows.append(f"| `{flag}` | {'(switch)' if nargs == 0 else 'one value'} | refused: {refusal_reason(flag)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table_markdown(), end="")
