"""Tiny models behind the sample checkpoints (and handy `--model` targets).

Every model is deterministic given `torch.manual_seed` and small enough that its checkpoints stay
well under 200 KB. Use them as ``--model sample_models.models:SmallCNN``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BufferNet", "SmallCNN", "TiedLM", "TransferCNN"]


class SmallCNN(nn.Module):
    """A small image classifier: two 3x3 conv blocks, a 1x1 projection block, a linear head.

    `conv1` and `conv1x1` sit side by side on purpose: the pattern `conv1` must select
    `conv1.weight` and `conv1.bias`, never `conv1x1.*`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv1x1 = nn.Conv2d(32, 32, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv1x1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class TransferCNN(SmallCNN):
    """SmallCNN's backbone (same layer names) under a new two-layer head `head` instead of `fc`.

    Load a SmallCNN checkpoint into it and the backbone matches while `head.*` is missing and
    `fc.*` is unexpected: the usual fine-tuning situation.
    """

    def __init__(self, num_classes: int = 5, in_channels: int = 3, hidden: int = 16) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        del self.fc
        self.head = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TiedLM(nn.Module):
    """A toy language model whose output projection shares the embedding matrix.

    `embed.weight` and `head.weight` are one Parameter, so their checkpoint tensors share storage.
    """

    def __init__(self, vocab_size: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.norm(h + self.block(h)))


class BufferNet(nn.Module):
    """Buffers of every sort: persistent `scale`, non-persistent `cache`, BatchNorm statistics.

    `cache` never reaches a state_dict; `bn.num_batches_tracked` is an int64 0-d buffer.
    """

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, features))
        self.register_buffer("cache", torch.zeros(features), persistent=False)
        self.bn = nn.BatchNorm1d(features)
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x) * self.scale)
