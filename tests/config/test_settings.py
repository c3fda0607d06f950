"""The command line fills the configs 1:1 and refuses bad values with a message that carries the fix."""
import pytest

from megalite.config.settings import DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from megalite.training.arguments import build_parser, parse_args

MOCK = ["--mock-data"]


def test_every_field_is_a_flag_with_megatron_name():
    flags = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "seq_length", "max_position_embeddings", "micro_batch_size", "global_batch_size", "train_iters",
                 "lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay", "clip_grad", "seed",
                 "data_path", "split", "tokenizer_type", "vocab_file", "merge_file", "save", "load", "save_interval",
                 "eval_interval", "eval_iters", "log_interval", "hidden_dropout", "attention_dropout",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "bf16", "fp16", "normalization",
                 "swiglu", "position_embedding_type", "untie_embeddings_and_output_weights", "mock_data",
                 "make_vocab_size_divisible_by", "init_method_std", "adam_beta1", "adam_beta2", "adam_eps",
                 "distributed_timeout_minutes", "context_parallel_size", "virtual_pipeline_model_parallel_size",
                 "num_layers_per_virtual_pipeline_stage", "sequence_parallel", "recompute_granularity",
                 "recompute_method", "recompute_num_layers", "pipeline_schedule", "use_distributed_optimizer",
                 "overlap_grad_reduce", "ddp_bucket_size", "loss_scale", "initial_loss_scale", "min_loss_scale",
                 "loss_scale_window", "hysteresis", "tokenizer_model", "log_json", "exit_interval"):
        assert flags[name] == "--" + name.replace("_", "-"), name
    assert flags["add_bias_linear"] == "--disable-bias-linear"


def test_flags_reach_fields():
    model, parallel, opt, data, train = parse_args(
        MOCK + ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8", "--group-query-attention",
                "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
                "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--lr", "1e-3",
                "--min-lr", "1e-4", "--bf16", "--adam-beta2", "0.95", "--micro-batch-size", "2",
                "--global-batch-size", "16", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                "--lr-decay-style", "cosine", "--log-json", "x.jsonl"], world_size=8)
    assert (model.num_layers, model.hidden_size, model.num_query_groups, model.swiglu) == (4, 128, 2, True)
    assert (model.normalization, model.position_embedding_type, model.add_bias_linear) == ("RMSNorm", "rope", False)
    assert model.untie_embeddings_and_output_weights
    # TP and SP are one flag each and one field each, ParallelConfig's: the model is handed them where it is built.
    assert parallel.tensor_model_parallel_size == 2 and parallel.sequence_parallel
    assert not hasattr(model, "tensor_model_parallel_size") and not hasattr(model, "sequence_parallel")
    assert parallel.virtual_pipeline_model_parallel_size == 2 and parallel.data_parallel_size == 2
    assert (opt.lr, opt.min_lr, opt.bf16, opt.adam_beta2) == (1e-3, 1e-4, True, 0.95)
    assert (train.micro_batch_size, train.global_batch_size, train.lr_decay_style) == (2, 16, "cosine")
    assert train.lr_decay_iters == train.train_iters and train.log_json == "x.jsonl"
    assert data.mock_data and data.data_path is None


def test_defaults_fill_from_other_configs():
    _, _, _, _, train = parse_args(MOCK + ["--micro-batch-size", "3"], world_size=4)
    assert train.global_batch_size == 12          # micro-batch x DP
    assert train.num_microbatches(4) == 1


@pytest.mark.parametrize("argv, world, message", [
    (["--global-batch-size", "7", "--micro-batch-size", "2"], 2,
     "--global-batch-size 7 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4; try 8"),
    (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by --tensor-model-parallel-size 3"),
    # The model's shape split over TP (ModelConfig.check_tensor_parallel, with ParallelConfig's sizes).
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4; use a TP size that divides it"),
    (["--ffn-hidden-size", "6", "--tensor-model-parallel-size", "4"], 4,
     "--ffn-hidden-size 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--sequence-parallel", "--seq-length", "10", "--tensor-model-parallel-size", "4"], 4,
     "--sequence-parallel needs --seq-length 10 divisible by --tensor-model-parallel-size 4"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "use a multiple of 2 layers"),
    (["--virtual-pipeline-model-parallel-size", "2"], 1, "needs --pipeline-model-parallel-size > 1"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], 1, "--hidden-size 30 is not divisible by"),
    (["--num-query-groups", "2"], 1, "add that flag"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are exclusive"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], 1, "--min-lr 0.001 is above --lr 0.0001"),
    (["--lr-warmup-iters", "50", "--train-iters", "10"], 1, "--lr-warmup-iters 50 exceeds --lr-decay-iters 10"),
    (["--lr-decay-style", "exp"], 1, "invalid choice: 'exp'"),
    (["--save-interval", "5"], 1, "--save-interval 5 needs --save DIR"),
    (["--num-layers", "two"], 1, "invalid int value: 'two'"),
    (["--split", "a,b"], 1, "--split 'a,b' must be comma-separated numbers"),
    (["--tokenizer-type", "GPT2BPETokenizer"], 1, "needs --vocab-file and --merge-file"),
    # Declared ranges (config.flag): each bad size or probability is one line naming the flag.
    (["--num-attention-heads", "0"], 1, "--num-attention-heads must be at least 1, got 0"),
    (["--hidden-size", "-64"], 1, "--hidden-size must be at least 1, got -64"),
    (["--seq-length", "0"], 1, "--seq-length must be at least 1, got 0"),
    (["--make-vocab-size-divisible-by", "0"], 1, "--make-vocab-size-divisible-by must be at least 1, got 0"),
    (["--hidden-dropout", "1.5"], 1, "--hidden-dropout must be below 1, got 1.5"),
    (["--ffn-hidden-size", "0"], 1, "--ffn-hidden-size must be at least 1, got 0"),
    (["--adam-beta1", "2"], 1, "--adam-beta1 must be below 1, got 2.0"),
    (["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes must be above 0, got 0.0"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "5"], 2,
     "--decoder-first-pipeline-num-layers 5: first stage 5 and last stage None layers do not add up"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved"], 2,
     "--pipeline-schedule interleaved with --virtual-pipeline-model-parallel-size 1: the interleaved schedule needs"),
])
def test_bad_values_are_refused_with_the_fix(argv, world, message):
    with pytest.raises(ValueError) as error:
        parse_args(MOCK + argv, world_size=world)
    assert message in str(error.value)


def test_missing_data_path():
    with pytest.raises(ValueError, match="--data-path is required .* or pass --mock-data"):
        parse_args(["--num-layers", "2"], world_size=1)
    with pytest.raises(ValueError, match="--data-path needs --tokenizer-type"):
        parse_args(["--data-path", "corpus_text_document"], world_size=1)


def test_configs_construct_directly():
    # The dataclasses validate themselves without the command line too.
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        ParallelConfig(tensor_model_parallel_size=4, world_size=6)
    with pytest.raises(ValueError, match="--micro-batch-size must be at least 1"):
        TrainingConfig(micro_batch_size=0)
    assert DataConfig(mock_data=True).split == "969,30,1"
    assert ModelConfig().padded_vocab_size(1) == 256 and ModelConfig().padded_vocab_size(4) == 512
    assert OptimizerConfig().clip_grad == 1.0


def test_help_comes_from_the_fields():
    help_text = " ".join(build_parser().format_help().split())
    # The sentence declared next to the field, its default, its choices; a switch reads the right way round.
    assert "--seq-length SEQ_LENGTH tokens per sample (default: 64)" in help_text
    assert "--normalization {LayerNorm,RMSNorm} normalization layer (default: LayerNorm)" in help_text
    assert "--disable-bias-linear drop the biases of every linear layer (LLaMA style)" in help_text
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_configs_check_their_choices_when_built_directly():
    with pytest.raises(ValueError, match="--normalization 'BatchNorm': choose one of LayerNorm, RMSNorm"):
        ModelConfig(normalization="BatchNorm")
    with pytest.raises(ValueError, match="--pipeline-schedule 'pipedream': choose one of gpipe, 1f1b"):
        ParallelConfig(pipeline_schedule="pipedream")


# Sharding strategies that do not compose, refused in one line each (megalite.training.arguments.check_zero3_composes;
# OptimizerConfig._check_sharding).
ZERO3 = ["--data-parallel-sharding-strategy", "optim_grads_params"]
ZB_H1 = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-h1"]


@pytest.mark.parametrize("argv, world, message", [
    (["--overlap-param-gather", "--overlap-grad-reduce"], 2,
     "--overlap-param-gather overlaps the all-gather of sharded parameters; add --use-distributed-optimizer or a "
     "--data-parallel-sharding-strategy other than no_shard"),
    (["--use-torch-fsdp2", "--data-parallel-sharding-strategy", "optim"], 2,
     "--use-torch-fsdp2 shards parameters, gradients and optimizer state; it cannot take "
     "--data-parallel-sharding-strategy optim: drop one of them"),
    (ZERO3 + ZB_H1, 4,
     "--pipeline-schedule zb-h1 with --data-parallel-sharding-strategy optim_grads_params (ZeRO-3): zero-bubble "
     "computes weight gradients after the backward that gathers the parameters; use --pipeline-schedule 1f1b, or "
     "--data-parallel-sharding-strategy optim_grads"),
    (["--use-megatron-fsdp", "--compile"], 2,
     "--compile with --use-megatron-fsdp (ZeRO-3): the compiled layers' backward takes the parameters gathered "
     "again for it as modified in place and fails; drop --compile, or use --data-parallel-sharding-strategy "
     "optim_grads"),
])
def test_sharding_that_does_not_compose_is_refused_in_one_line(argv, world, message):
    with pytest.raises(ValueError) as error:
        parse_args(MOCK + argv, world_size=world)
    assert str(error.value) == message


@pytest.mark.parametrize("argv, world", [
    (["--data-parallel-sharding-strategy", "optim_grads"] + ZB_H1, 4),   # ZeRO-2 keeps parameters whole
    (ZERO3 + ["--pipeline-model-parallel-size", "2"], 4),                 # ZeRO-3 under 1F1B
    (["--data-parallel-sharding-strategy", "optim_grads", "--compile"], 2),
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads", "--compile"], 2),
])
def test_the_neighbouring_combinations_are_accepted(argv, world):
    parse_args(MOCK + argv, world_size=world)
