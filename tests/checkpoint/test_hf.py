"""Hugging Face in and out: exported models give megalite's logits in transformers, imported ones
give transformers' loss in megalite, and HF -> megalite -> HF returns the same weights."""
import json
import os

import pytest
import torch

from megalite.checkpoint import paths
from megalite.checkpoint.hf import main as convert
from megalite.parallel.testing import run_on_ranks

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

COMMON = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
          "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "100",
          "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "3e-3", "--log-interval", "1000", "--eval-iters", "0", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--train-iters", "3"]
FAMILIES = {
    "gpt2": ["--openai-gelu"],
    "llama": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
              "--num-query-groups", "2", "--ffn-hidden-size", "48"],
}
# float32 round-off between two implementations of the same sums (fused vs separate projections,
# another summation order in the norms): ~1e-6 on O(1) logits.
ATOL = 1e-5


def _train(rank, world_size, argv):
    from megalite.training.loop import pretrain
    pretrain(argv)


def _megalite_logits(rank, world_size, save, tokens, finetune_argv):
    """Logits of the checkpoint at ``save`` through megalite's own model (one rank)."""
    from megalite.checkpoint.merge import load_model
    model, _ = load_model(save)
    with torch.no_grad():
        return model(tokens).float().permute(1, 0, 2)           # [b, s, padded vocab]


def _megalite_loss(rank, world_size, argv):
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    run.scheduler.max_lr = run.scheduler.min_lr = 0.0            # measure, do not move
    return train_step(run)["loss"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_gives_the_same_logits_in_transformers(tmp_path, family):
    save, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    run_on_ranks(_train, 4, COMMON + FAMILIES[family] + layout + ["--save", save], timeout=180)
    assert convert(["--to", "hf", "--load", save, "--save", hf]) == 0
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    theirs = model(tokens).logits
    ours = run_on_ranks(_megalite_logits, 1, save, tokens, [], timeout=120)[0][..., :100]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)


def _random_hf_model(family, folder):
    torch.manual_seed(3)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "qwen3":   # q/k norms, a head dim of its own, a tied output layer, Llama 3 RoPE scaling
        config = transformers.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=16, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192})
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES) + ["qwen3"])
def test_import_gives_transformers_loss_and_exports_the_same_weights(tmp_path, family):
    hf, save, back = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "back")
    model = _random_hf_model(family, hf)
    assert convert(["--from", "hf", "--load", hf, "--save", save]) == 0
    assert paths.read_latest_iteration(save) == 0
    # megalite's loss on its (deterministic) first mock batch, from the imported weights (--finetune).
    # The model's flags come from the checkpoint (the command line's COMMON sizes would agree, but
    # not its norm epsilon: LLaMA's is 1e-6).
    argv = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
            "--eval-iters", "0", "--load", save, "--finetune", "--use-checkpoint-args"]
    ours = run_on_ranks(_megalite_loss, 1, argv, timeout=120)[0]
    from megalite.data.gpt_dataset import MockGPTDataset
    batch = [MockGPTDataset(100, 16, 4, 1234)[i] for i in range(4)]
    tokens, labels, mask, positions = (torch.stack([torch.from_numpy(b[key]) for b in batch])
                                       for key in ("tokens", "labels", "loss_mask", "position_ids"))
    with torch.no_grad():
        logits = model(tokens, position_ids=positions).logits
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1), reduction="none")
    theirs = ((per_token * mask.reshape(-1)).sum() / mask.sum()).item()
    assert ours == pytest.approx(theirs, abs=ATOL)
    # And back out: the same tensors, bit for bit.
    assert convert(["--to", "hf", "--load", save, "--save", back]) == 0
    from safetensors.torch import load_file
    original = {k: v for name in os.listdir(hf) if name.endswith(".safetensors")
                for k, v in load_file(os.path.join(hf, name)).items()}
    again = load_file(os.path.join(back, "model.safetensors"))
    assert set(again) >= set(original)
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name


def test_unconvertible_models_are_refused(tmp_path):
    save = str(tmp_path / "ckpt")
    run_on_ranks(_train, 1, COMMON + ["--swiglu", "--save", save], timeout=120)
    assert convert(["--to", "hf", "--load", save, "--save", str(tmp_path / "hf")]) == 2
