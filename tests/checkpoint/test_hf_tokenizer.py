"""Export writes the tokenizer a run used, so ``AutoTokenizer.from_pretrained(exported)`` gives megalite's
ids: megalite's own trained byte-level BPE (GPT-2's file format) and a Hugging Face tokenizer.json; a
run without a text vocabulary gets none, and says so.  End to end: a tied LLaMA-style run at TP=2
exports (model and tokenizer) and loads in transformers."""
import json
import os

import pytest
import torch

from megalite.checkpoint.hf import main as convert
from megalite.checkpoint.hf_tokenizer import plan_tokenizer, write_tokenizer
from megalite.parallel.testing import run_on_ranks

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
        "def main():\n    return 42  # naïve café, 東京, emoji 🙂\n") * 20
SAMPLE = "The lazy fox packs five jugs; café 東京 🙂 returns 42.\n  indented"


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    from megalite.data.train_tokenizer import train
    root = tmp_path_factory.mktemp("bpe")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return train([str(corpus)], 320, str(root / "tokenizer"), min_frequency=1)


def _exported(plan, folder):
    os.makedirs(folder)
    write_tokenizer(plan, folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_megalites_trained_bpe_exports_as_gpt2_files_with_the_same_ids(tmp_path, bpe_files):
    from megalite.data.tokenizer import GPT2BPETokenizer
    vocab, merges = bpe_files
    plan = plan_tokenizer({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}, 64)
    theirs = _exported(plan, str(tmp_path / "hf"))
    ours = GPT2BPETokenizer(vocab, merges)
    assert theirs.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eod
    assert sorted(os.listdir(tmp_path / "hf")) == ["merges.txt", "tokenizer_config.json", "vocab.json"]


def test_a_hugging_face_tokenizer_json_exports_with_the_same_ids(tmp_path):
    from megalite.data.tokenizer import HuggingFaceTokenizer
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<|endoftext|>"],
                                             show_progress=False)
    model.train_from_iterator([TEXT], trainer)
    path = str(tmp_path / "tok" / "tokenizer.json")
    os.makedirs(os.path.dirname(path))
    model.save(path)
    plan = plan_tokenizer({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": path}, 64)
    theirs = _exported(plan, str(tmp_path / "hf"))
    assert theirs.encode(SAMPLE, add_special_tokens=False) == HuggingFaceTokenizer(path).encode(SAMPLE)


def test_a_run_without_a_text_vocabulary_writes_no_tokenizer_and_says_so():
    plan = plan_tokenizer({"mock_data": True}, 64)
    assert plan.copies == {} and plan.config is None and "--mock-data" in plan.note
    assert "NullTokenizer" in plan_tokenizer({"tokenizer_type": "NullTokenizer"}, 64).note


def test_a_missing_tokenizer_file_is_named_before_anything_is_written(tmp_path, bpe_files):
    with pytest.raises(FileNotFoundError, match="--merge-file /nowhere/merges.txt"):
        plan_tokenizer({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": bpe_files[0],
                        "merge_file": "/nowhere/merges.txt"}, 64)


def _train(rank, world_size, argv):
    from megalite.training.loop import pretrain
    pretrain(argv)


def test_a_tied_llama_run_exports_model_and_tokenizer(tmp_path, bpe_files):
    """The case that crashed (a tied LLaMA-style model: 'Some tensors share memory'), at TP=2, with the
    run's own BPE: transformers loads both, and the model's logits are megalite's."""
    vocab, merges = bpe_files
    save, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    argv = ["--mock-data", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
            "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "48",
            "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "2", "--log-interval", "1000", "--eval-iters", "0", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--tensor-model-parallel-size", "2", "--save", save]
    run_on_ranks(_train, 2, argv, timeout=180)
    assert convert(["--to", "hf", "--load", save, "--save", hf]) == 0
    assert json.load(open(os.path.join(hf, "config.json")))["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    ids = torch.tensor([tokenizer.encode(SAMPLE, add_special_tokens=False)[:16]])
    from tests.checkpoint.test_hf import _megalite_logits
    ours = run_on_ranks(_megalite_logits, 1, save, ids, [], timeout=120)[0][..., :model.config.vocab_size]
    torch.testing.assert_close(model(ids).logits, ours, rtol=0, atol=1e-5)


def test_export_refusal_writes_nothing(tmp_path, capsys):
    """A GPT-style model with grouped-query attention (GPT-2 has none) is refused in one line, before the
    export folder is made."""
    save, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    from tests.checkpoint.test_hf import COMMON
    run_on_ranks(_train, 1, COMMON + ["--group-query-attention", "--num-query-groups", "2", "--save", save],
                 timeout=120)
    capsys.readouterr()
    assert convert(["--to", "hf", "--load", save, "--save", hf]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "one key/value group per head" in error[0]
    assert not os.path.exists(hf)
