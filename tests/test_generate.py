"""megalite-generate's input: every prompt id (however it was made) inside the model's vocabulary, the
sampling flags range-checked in one line before anything loads, and Megatron's --top-p."""
import pytest
import torch

from megalite.generate import _filtered, main, prompt_to_ids


class Tokenizer:
    def __init__(self, eod, ids):
        self.eod, self._ids = eod, ids

    def encode(self, text):
        return list(self._ids)


def test_an_empty_prompt_starts_from_the_eod_only_when_the_model_has_it():
    assert prompt_to_ids("", Tokenizer(eod=63, ids=[1]), 64) == [63]
    assert prompt_to_ids("   ", Tokenizer(eod=63, ids=[]), 64) == [63]
    with pytest.raises(ValueError, match=r"^--prompt: end-of-document id \(an empty prompt starts there\) 257 is "
                                         r"outside the model's vocabulary of 257 ids \(0 to 256\)"):
        prompt_to_ids("", Tokenizer(eod=257, ids=[]), 257)


def test_tokenizer_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="^--prompt: token id 70 is outside the model's vocabulary of 64 ids"):
        prompt_to_ids("text", Tokenizer(eod=0, ids=[3, 70]), 64)
    assert prompt_to_ids("text", Tokenizer(eod=0, ids=[3, 7]), 64) == [3, 7]


def test_id_prompts_without_a_tokenizer():
    assert prompt_to_ids(" 3  5 ", None, 64) == [3, 5] and prompt_to_ids("  ", None, 64) == [0]
    with pytest.raises(ValueError, match="^--prompt: token id -1 is outside"):
        prompt_to_ids("-1", None, 64)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature=-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--top-k=-5"], "--top-k must be >= 0, got -5"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1: off), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1] (1: off), got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1] (1: off), got nan"),
    (["--max-new-tokens=-2"], "--max-new-tokens must be >= 0, got -2"),
])
def test_sampling_flags_are_checked_before_anything_loads(tmp_path, capsys, flags, message):
    assert main(["--load", str(tmp_path / "none")] + flags) == 2
    err = capsys.readouterr().err
    assert err == f"megalite-generate: error: {message}\n"


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    kept = lambda p: torch.isfinite(_filtered(logits, 0, p)).tolist()   # noqa: E731
    assert kept(1.0) == [True, True, True]
    assert kept(0.5) == [False, True, False]          # the likeliest id alone holds 0.5
    assert kept(0.6) == [False, True, True]           # 0.5 + 0.3 reaches 0.6
    assert kept(0.81) == [True, True, True]
    assert torch.isfinite(_filtered(logits, 1, 1.0)).tolist() == [False, True, False]   # top-k 1


def test_a_tiny_temperature_samples_instead_of_failing():
    from megalite.config.settings import ModelConfig
    from megalite.generate import sample
    from megalite.model.gpt import GPTModel
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32,
                         make_vocab_size_divisible_by=32)
    model = GPTModel(config, layer_numbers=[0]).eval()
    ids = sample(model, config, [1, 2], max_new_tokens=3, vocab_size=32, temperature=1e-40)
    assert len(ids) == 5 and all(0 <= i < 32 for i in ids)
