"""An exported model (with its tokenizer) is scored by lm-evaluation-harness's Hugging Face model as
transformers scores it.  lm-evaluation-harness is not a megalite dependency: without it this skips."""
import json
import os

import pytest
import torch

from megalite.checkpoint.hf import to_hf
from megalite.checkpoint.hf_tokenizer import plan_tokenizer, write_tokenizer
from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel


def test_lm_eval_scores_an_exported_model_as_transformers_does(tmp_path):
    # Skipped here rather than at import: tests/conftest.py's collection hook would turn a module-level
    # skip into a collection error.
    lm_eval_models = pytest.importorskip("lm_eval.models.huggingface")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from safetensors.torch import save_file

    from megalite.data.train_tokenizer import train
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50)
    vocab, merges = train([str(corpus)], 300, str(tmp_path / "bpe"), min_frequency=1)
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=32,
                         vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0, openai_gelu=True)
    hf_config, tensors = to_hf(dict(GPTModel(config).state_dict()), config)
    folder = str(tmp_path / "hf")
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    json.dump(hf_config, open(os.path.join(folder, "config.json"), "w"))
    write_tokenizer(plan_tokenizer({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab,
                                    "merge_file": merges}, 32), folder)

    harness = lm_eval_models.HFLM(pretrained=folder, device="cpu", batch_size=1, dtype="float32")
    from lm_eval.api.instance import Instance
    request = Instance(request_type="loglikelihood", doc={}, arguments=("the cat sat on the", " mat"), idx=0)
    (score, _), = harness.loglikelihood([request])

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    context, target = tokenizer.encode("the cat sat on the"), tokenizer.encode(" mat")
    ids = torch.tensor([context + target])
    with torch.no_grad():
        log_probs = model(ids).logits.log_softmax(-1)[0, len(context) - 1:-1]
    expected = log_probs.gather(1, torch.tensor(target)[:, None]).sum().item()
    assert score == pytest.approx(expected, abs=1e-4)
