"""The megalite-convert command: ``--to megatron`` / ``--from megatron`` convert Megatron-LM checkpoints
(megatron_format.py), every other direction is Hugging Face's (hf.py).

    megalite-convert --to megatron --load CKPT --save DIR [--ckpt-format torch|torch_dist]
                     [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--megatron-spec local|te]
                     [--use-legacy-models] [--expert-model-parallel-size E] [--moe-grouped-gemm]
    megalite-convert --from megatron --load DIR --save CKPT
    megalite-convert --to hf ... / --from hf ...            (see megalite/checkpoint/hf.py)
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _megatron_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Megatron-LM checkpoints in and out (docs/megatron.md)")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["megatron"], help="export a megalite checkpoint to Megatron-LM")
    direction.add_argument("--from", dest="source", choices=["megatron"], help="import a Megatron-LM checkpoint")
    parser.add_argument("--load", required=True, help="the checkpoint root to read")
    parser.add_argument("--save", required=True, help="the checkpoint root to write")
    parser.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dist"],
                        help="export: Megatron-LM's legacy per-rank files (torch) or torch.distributed.checkpoint "
                             "(torch_dist); an import reads either")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="export: the TP size of the files (torch) and of the vocabulary padding")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="export: the pipeline stages of the files (torch)")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1,
                        help="export: the expert-parallel size of the files (torch): mp_rank_TT[_PPP]_EEE, each "
                             "EP rank's experts under local indices")
    parser.add_argument("--moe-grouped-gemm", action="store_true",
                        help="export: the experts in TEGroupedMLP's layout (linear_fc1.weight{k}; with "
                             "--megatron-spec te), else SequentialMLP's (local_experts.{k})")
    parser.add_argument("--megatron-spec", default="local", choices=["local", "te"],
                        help="export: megatron-core's layer spec the names follow: local modules "
                             "(get_gpt_layer_local_spec) or Transformer Engine's fused layer norms")
    parser.add_argument("--use-legacy-models", action="store_true",
                        help="export: the state dict of Megatron-LM's GPT model before megatron-core (language_model, "
                             "encoder), which transformers' Megatron GPT-2 converter reads; --ckpt-format torch only")
    return parser


def _megatron_main(argv, prog: str) -> int:
    from megalite.checkpoint.megatron_format import export_megatron, import_megatron
    parser = _megatron_parser(prog)
    args = parser.parse_args(argv)
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                        ("--expert-model-parallel-size", args.expert_model_parallel_size)):
        if value < 1:
            parser.error(f"{flag} {value}: it must be at least 1")
    try:
        if args.to:
            written = export_megatron(args.load, args.save, ckpt_format=args.ckpt_format,
                                      tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                      spec=args.megatron_spec, legacy_models=args.use_legacy_models,
                                      ep=args.expert_model_parallel_size, grouped=args.moe_grouped_gemm)
        else:
            written = import_megatron(args.load, args.save)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def main(argv=None, prog: str = "megalite-convert") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg.split("=")[0] in ("--to", "--from") for arg in argv):
        print(f"usage: {prog} (--to | --from) (hf | megatron) --load DIR --save DIR ...\n{__doc__}",
              file=sys.stdout if {"-h", "--help"} & set(argv) else sys.stderr)
        return 0 if {"-h", "--help"} & set(argv) else 2
    if "megatron" in {value for flag, value in zip(argv, argv[1:]) if flag in ("--to", "--from")} or \
            any(arg in ("--to=megatron", "--from=megatron") for arg in argv):
        return _megatron_main(argv, prog)
    from megalite.checkpoint.hf import main as hf_main
    return hf_main(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.checkpoint.convert"))
