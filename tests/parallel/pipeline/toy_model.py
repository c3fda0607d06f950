"""A tiny stand-in with GPTModel's pipeline interface, for schedule tests that must not depend on
the real model's cost: tied embedding on the first stage, residual tanh-MLP layers named by GLOBAL
layer number, the output layer (a copy of the embedding, ``shared_embedding``) and loss on the last."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ToyConfig:
    num_layers: int = 8
    hidden_size: int = 16
    vocab_size: int = 32
    seq_length: int = 6
    seed: int = 1234
    sequence_parallel: bool = False


def seeded(name: str, seed: int, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 100003)
    return torch.randn(shape, generator=generator) * 0.3


class ToyLayer(nn.Module):
    def __init__(self, config, number):
        super().__init__()
        h = config.hidden_size
        self.fc = nn.Linear(h, h)
        with torch.no_grad():
            self.fc.weight.copy_(seeded(f"layers.{number}.fc.weight", config.seed, (h, h)))
            self.fc.bias.copy_(seeded(f"layers.{number}.fc.bias", config.seed, (h,)))

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class ToyOutput(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.weight.shared_embedding = True

    def forward(self, hidden):
        return F.linear(hidden, self.weight)


class ToyModel(nn.Module):
    def __init__(self, config, *, pre_process=True, post_process=True, layer_numbers=None):
        super().__init__()
        self.config, self.pre_process, self.post_process = config, pre_process, post_process
        embedding = seeded("embedding.weight", config.seed, (config.vocab_size, config.hidden_size))
        if pre_process:
            self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding.clone())
            self.embedding.weight.shared_embedding = True
        numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleDict({str(n): ToyLayer(config, n) for n in numbers})
        if post_process:
            self.output = ToyOutput(embedding.clone()) if not pre_process else None
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, tokens, position_ids=None, labels=None):
        x = self.embedding(tokens).transpose(0, 1) if self.pre_process else self.input_tensor   # [s, b, h]
        for layer in self.layers.values():
            x = layer(x)
        if not self.post_process:
            return x
        logits = self.output(x) if self.output is not None else F.linear(x, self.embedding.weight)  # [s, b, V]
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")                  # [b, s]
