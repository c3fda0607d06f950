"""Data: tokenizers, the .bin/.idx format, GPT sample streams, blending and sampling."""
from megalite.data.blended import BlendedDataset
from megalite.data.gpt_dataset import GPTDataset, MockGPTDataset, build_gpt_datasets
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megalite.data.sampler import PretrainingSampler
from megalite.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["BlendedDataset", "GPTDataset", "MockGPTDataset", "build_gpt_datasets", "IndexedDataset",
           "IndexedDatasetBuilder", "IndexedDatasetError", "PretrainingSampler", "Tokenizer", "build_tokenizer"]
