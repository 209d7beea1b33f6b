"""A LLaMA-7B-shaped model for the `--model` benchmark (6.74 B parameters, 291 tensors).

Only the parameter names and shapes matter: `ckptsurgeon ... --model benchmarks/big_model.py:Llama7B`
builds it on the meta device and compares its keys and shapes with a checkpoint's. The names follow
Hugging Face's ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight`` ...). No forward
pass is needed, so none is defined beyond the obvious one.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (one ``weight`` of shape ``(dim,)``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim)
        self.mlp = MLP(dim, hidden)
        self.input_layernorm = RMSNorm(dim)
        self.post_attention_layernorm = RMSNorm(dim)


class LlamaModel(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)


class Llama7B(nn.Module):
    """LLaMA-7B shapes: 32 layers, dim 4096, FFN 11008, vocabulary 32000, untied output head."""

    def __init__(self, vocab: int = 32000, dim: int = 4096, hidden: int = 11008, layers: int = 32) -> None:
        super().__init__()
        self.model = LlamaModel(vocab, dim, hidden, layers)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
