"""Megatron's implementation switches: accepted, documented in one table; FP8 refused; unknown flags errors."""
import os

import pytest

from megalite.config.megatron_switches import ACCEPTED, REFUSED, refusal_reason, table_markdown
from megalite.training.arguments import build_parser, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8"]


def test_the_docs_page_holds_the_table_of_the_code():
    with open(os.path.join(ROOT, "docs", "megatron_flags.md")) as f:
        page = f.read()
    block = page.split("<!-- switches:begin -->\n")[1].split("<!-- switches:end -->")[0]
    assert block == table_markdown(), "regenerate with python -m megalite.config.megatron_switches"


def _argv_of(switch):
    if switch.flag == "--attention-backend":
        return [switch.flag, "flash"]
    if switch.flag == "--data-impl":
        return [switch.flag, "mmap"]
    if switch.value_type is not None:
        return [switch.flag, "30"]
    return [switch.flag] + ([switch.choices[-1]] if switch.choices else [])


# The flags that set each field a switch requires (Megatron accepts the switch only beside them).
MOE = ["--num-experts", "4", "--disable-bias-linear"]
REQUIRED = {"use_distributed_optimizer": ["--use-distributed-optimizer"],
            "overlap_grad_reduce": ["--overlap-grad-reduce"],
            "moe_shared_expert_intermediate_size": MOE + ["--moe-shared-expert-intermediate-size", "8"],
            "moe_grouped_gemm": MOE + ["--moe-grouped-gemm"],
            "use_megatron_fsdp": ["--use-megatron-fsdp"], "--use-nccl-ub": ["--use-nccl-ub"]}


def test_every_accepted_switch_parses_and_changes_no_setting():
    for switch in ACCEPTED:
        extra = [arg for name in switch.requires for arg in REQUIRED[name]]
        configs = parse_args(BASE + extra + _argv_of(switch), world_size=1)
        if switch.on_field:
            continue   # a field megalite reads (compared in its own tests)
        assert configs == parse_args(BASE + extra, world_size=1), switch.flag


def test_every_switch_is_a_flag_of_the_parser_with_its_sentence():
    helps = {option: action.help for action in build_parser()._actions for option in action.option_strings}
    for switch in ACCEPTED:
        assert switch.flag in helps, switch.flag
        if not switch.on_field:
            assert switch.instead in helps[switch.flag]


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_fp8_and_transformer_engine_flags_are_refused_in_one_line(flag, tmp_path):
    argv = [flag] + (["1"] if REFUSED[flag] else [])
    with pytest.raises(ValueError) as error:
        parse_args(BASE + argv, world_size=1)
    assert str(error.value) == f"{flag}: {refusal_reason(flag)}"
    config = tmp_path / "run.yaml"          # the same from a --config file
    config.write_text(f"{flag[2:]}: {'1' if REFUSED[flag] else 'true'}\n")
    with pytest.raises(ValueError) as error:
        parse_args(BASE + ["--config", str(config)], world_size=1)
    assert str(error.value) == f"{flag}: {refusal_reason(flag)}"
    # FP8's reason for FP8 flags; --tp-comm-overlap's own (it is not about FP8).
    assert ("FP8 needs TransformerEngine" in str(error.value)) == (flag != "--tp-comm-overlap")


def test_a_switch_is_refused_without_what_megatron_requires_with_it():
    with pytest.raises(ValueError, match="^--overlap-param-gather overlaps the all-gather of sharded parameters; "
                                         "add --use-distributed-optimizer or a --data-parallel-sharding-strategy"):
        parse_args(BASE + ["--overlap-param-gather", "--overlap-grad-reduce"], world_size=1)
    with pytest.raises(ValueError, match="--moe-use-legacy-grouped-gemm needs --moe-grouped-gemm"):
        parse_args(BASE + MOE + ["--moe-use-legacy-grouped-gemm"], world_size=1)
    # A required flag may be another switch of the table (named by its flag, not a config field).
    with pytest.raises(ValueError) as error:
        parse_args(BASE + ["--use-megatron-fsdp", "--fsdp-manual-registration"], world_size=1)
    assert str(error.value) == ("--fsdp-manual-registration needs --use-megatron-fsdp and --use-nccl-ub (as in "
                                "Megatron-LM); add --use-nccl-ub")


@pytest.mark.parametrize("argv, message", [
    (["--no-such-fusion"], "unrecognized arguments: --no-such-fusion"),
    (["--ckpt-format", "zarr2"], "invalid choice: 'zarr2'"),
])
def test_an_unknown_flag_or_value_stays_an_error(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + argv, world_size=1)
