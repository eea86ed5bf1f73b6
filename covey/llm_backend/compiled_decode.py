"""Decode steps through torch.compile (inductor): fewer ops and less Python per token.

A decode step of a small model is mostly dispatch: each layer runs ~25 small ops (RMSNorm,
RoPE, SwiGLU, residual adds) around its four matmuls, one token per sequence. Inductor
fuses the elementwise work into a few generated C++ loops and calls the matmuls directly.

What is compiled: per decoder layer, the dense work before attention (norm, QKV, RoPE) and
after it (output projection, residual, norm, MLP, residual). Paged attention stays eager:
its shapes and block tables change every step. The two functions take the layer as an
argument, so the 30 layers share one compiled graph each (weights are graph inputs), and
the batch size is a dynamic dimension, so a new batch size does not compile again.

Compiling costs tens of seconds the first time. Inductor's caches live under
`covey_home()/inductor`, so later runs (another process, another day) load the generated
code instead; `warm_up` compiles at engine start, with progress, rather than inside the
first request. Prefill steps and mixed steps stay eager: they are matmul-bound.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from covey.errors import EngineError
from covey.home import covey_home
from covey.llm_backend.attention_metadata import AttentionMetadata
from covey.llm_backend.layers import apply_rotary
from covey.llm_backend.model import DecoderLayer, LlamaModel
from covey.llm_backend.paged_attention import paged_attention, store_kv

log = logging.getLogger(__name__)


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled code: the user's TORCHINDUCTOR_CACHE_DIR, else under
    covey's home. (torch writes its own default into the variable once inductor has run,
    so that value counts as unset.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    return str(covey_home() / "inductor")


def _pre_attention(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hidden] -> q [T, H, Dh], k and v [T, KVH, Dh] (RoPE applied to q and k)."""
    attn = layer.self_attn
    t = x.shape[0]
    qkv = attn.qkv_proj(layer.input_layernorm(x))
    qk = qkv[:, : attn.q_size + attn.kv_size].view(t, attn.num_heads + attn.num_kv_heads, -1)
    qk = apply_rotary(qk, cos, sin)
    q, k = qk.split([attn.num_heads, attn.num_kv_heads], dim=1)
    v = qkv[:, attn.q_size + attn.kv_size :].view(t, attn.num_kv_heads, attn.head_dim)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _post_attention(layer: DecoderLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Residual stream after attention output [T, H, Dh] and the MLP -> x [T, hidden]."""
    x = x + layer.self_attn.o_proj(out.reshape(x.shape[0], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class CompiledDecode:
    """The model's forward for pure decode steps, with the dense halves of each layer
    compiled. Same inputs and result as `LlamaModel.forward`."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()  # read at each compile
        opts = dict(backend="inductor", dynamic=True, fullgraph=True)
        self._pre: Callable = torch.compile(_pre_attention, **opts)
        self._post: Callable = torch.compile(_post_attention, **opts)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary(positions, x.dtype)
        for i, layer in enumerate(m.layers):
            q, k, v = self._pre(layer, x, cos, sin)
            store_kv(kv_cache[i], k, v, meta.slot_mapping)
            out = paged_attention(q, k, v, kv_cache[i], meta)
            x = self._post(layer, x, out)
        return m.norm(x)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 2), progress: bool = True) -> float:
        """Compile (or load from the cache) the graphs decode steps use, before any request:
        batch size 1 is specialized by torch, 2 stands for every larger one. Returns the
        seconds it took; prints progress on stderr when `progress`."""
        start = time.perf_counter()
        layer: nn.Module = self.model.layers[0]
        # The final norm's weight is dense whatever the quantization (an int4 model's
        # embedding table is packed int8): it gives the device and the compute dtype.
        dev = self.model.norm.weight.device
        dtype = self.model.norm.weight.dtype
        hidden = self.model.args.hidden_size
        steps = [(n, fn) for n in batch_sizes for fn in ("pre", "post")]
        bar = _progress(len(steps), progress)
        try:
            with torch.inference_mode():
                for n, fn in steps:
                    bar.set_description(f"compiling decode step (batch {n}, {fn}-attention)")
                    x = torch.zeros(n, hidden, dtype=dtype, device=dev)
                    cos, sin = self.model.rotary(torch.zeros(n, dtype=torch.long), dtype)
                    q, _, _ = self._pre(layer, x, cos.to(dev), sin.to(dev))
                    if fn == "post":
                        self._post(layer, x, q)
                    bar.update(1)
        except Exception as exc:
            raise EngineError(
                f"EngineConfig.compile=True, but torch.compile failed on this machine: {exc}"
                " (compile=False runs the same model eagerly)"
            ) from exc
        finally:
            bar.close()
        took = time.perf_counter() - start
        log.info("decode step compiled in %.1f s (cache: %s)", took, inductor_cache_dir())
        return took


class _Silent:
    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, show: bool):
    if not show:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, unit="graph", leave=False)
