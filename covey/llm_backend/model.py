"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a flat batch of tokens.

The model sees a step as one flat list of tokens with explicit positions; the paged pool
and the attention metadata say which keys each token sees. That one interface serves
chunked prefill, batched decode and recomputing a subset of positions.
"""

from __future__ import annotations

import torch
from torch import nn

from covey.llm_backend.attention_metadata import AttentionMetadata
from covey.llm_backend.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from covey.llm_backend.model_args import ModelArgs
from covey.llm_backend.paged_attention import paged_attention, store_kv


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.dim_per_head
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, -1)
        qk = apply_rotary(qk, cos, sin)  # [T, H + KVH, Dh]: one rotation for q and k
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H|KVH, Dh]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        store_kv(kv, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, kv, meta)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = (
            None
            if args.tie_embeddings
            else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(
            args.dim_per_head, args.max_position, args.rope_theta, args.rope_scaling
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T]; kv_cache [layers, 2, KVH, S, Dh] -> hidden [T, hidden]."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[i], meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            return (hidden @ self.embed_tokens.weight.t()).float()  # tied embeddings
        return self.lm_head(hidden).float()
