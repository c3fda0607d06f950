"""The tokenizer files of an exported Hugging Face folder, from the tokenizer a megalite run used, so
``transformers.AutoTokenizer.from_pretrained(folder)`` gives the same ids:

    --tokenizer-type GPT2BPETokenizer / TikTokenizer  --vocab-file --merge-file
        vocab.json + merges.txt (GPT-2's, or megalite-train-tokenizer's own byte-level BPE) and a
        tokenizer_config.json naming GPT2Tokenizer
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json
        tokenizer.json, with the tokenizer_config.json / special_tokens_map.json beside it when there
        are, else a tokenizer_config.json naming PreTrainedTokenizerFast
    NullTokenizer, --mock-data: no files (there is no text vocabulary); ``plan`` says so

Everything is checked (the files exist) before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Mapping, NamedTuple, Optional

__all__ = ["TokenizerPlan", "plan_tokenizer", "write_tokenizer"]

GPT2_SPECIAL = "<|endoftext|>"


class TokenizerPlan(NamedTuple):
    """Files to copy ({name in the export: source path}), the tokenizer_config.json to write (None: one is
    copied), and one line saying what was (or why nothing was) written."""

    copies: Dict[str, str]
    config: Optional[Dict[str, Any]]
    note: str


def _existing(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path} of the checkpoint's run is not there; put it back, or export "
                                f"without tokenizer files (--skip-tokenizer)")
    return path


def plan_tokenizer(data: Mapping[str, Any], max_length: int) -> TokenizerPlan:
    """What to write for a run whose DataConfig settings are ``data`` (a checkpoint's settings["data"])."""
    kind = data.get("tokenizer_type")
    if kind in ("GPT2BPETokenizer", "TikTokenizer") and data.get("vocab_file") and data.get("merge_file"):
        vocab = _existing(data["vocab_file"], "--vocab-file")
        merges = _existing(data["merge_file"], "--merge-file")
        with open(vocab, encoding="utf-8") as f:
            has_eod = GPT2_SPECIAL in json.load(f)
        special = {"bos_token": GPT2_SPECIAL, "eos_token": GPT2_SPECIAL, "unk_token": GPT2_SPECIAL} if has_eod else {}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": max_length,
                  **special}
        return TokenizerPlan({"vocab.json": vocab, "merges.txt": merges}, config,
                             f"tokenizer: GPT-2 byte-level BPE from {vocab} and {merges}")
    if kind == "HuggingFaceTokenizer" and (data.get("tokenizer_model") or data.get("vocab_file")):
        source = _existing(data.get("tokenizer_model") or data["vocab_file"], "--tokenizer-model")
        copies = {"tokenizer.json": source}
        beside = os.path.dirname(os.path.abspath(source))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(beside, name)):
                copies[name] = os.path.join(beside, name)
        config = None if "tokenizer_config.json" in copies else {"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "model_max_length": max_length}
        return TokenizerPlan(copies, config, f"tokenizer: Hugging Face tokenizer.json from {source}")
    why = "--mock-data" if data.get("mock_data") and not kind else f"--tokenizer-type {kind}"
    return TokenizerPlan({}, None, f"no tokenizer files: the run used {why}, which has no text vocabulary")


def write_tokenizer(plan: TokenizerPlan, folder: str) -> None:
    for name, source in plan.copies.items():
        shutil.copyfile(source, os.path.join(folder, name))
    if plan.config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(plan.config, f, indent=2)
