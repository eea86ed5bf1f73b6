"""Perplexity on held-out text: the quality measure every weight mode is held to.

The text is CPython's documentation topics (`pydoc_data.topics`, shipped with Python and
the source of covey's default corpus), never the prompts the tests generate from. It is cut
into back-to-back windows, each scored from a fresh context: perplexity is exp of the mean
negative log-likelihood of every token after the first in each window. The same windows
score any model that maps token ids to logits (covey in any mode, transformers), so two
figures from the same `heldout_windows` are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from covey.errors import InvalidRequestError
from covey.llm_backend.attention_metadata import AttentionMetadata, PrefillRun
from covey.llm_backend.model import LlamaModel

# Topics from the end of the sorted list: the benchmarks' prompts start at the beginning.
HELDOUT_FIRST_TOPIC = -40


def heldout_windows(
    encode: Callable[[str], list[int]], windows: int, window_tokens: int
) -> list[list[int]]:
    """`windows` back-to-back windows of `window_tokens` tokens of the held-out docs."""
    from pydoc_data.topics import topics

    if windows < 1 or window_tokens < 2:
        raise InvalidRequestError(
            f"perplexity needs windows >= 1 and window_tokens >= 2, got {windows}, "
            f"{window_tokens}"
        )
    names = sorted(topics)[HELDOUT_FIRST_TOPIC:]
    ids = encode("\n\n".join(topics[name] for name in names))
    if len(ids) < windows * window_tokens:
        raise InvalidRequestError(
            f"the held-out text has {len(ids)} tokens, fewer than {windows} x {window_tokens}"
        )
    return [ids[i * window_tokens : (i + 1) * window_tokens] for i in range(windows)]


def perplexity_of(logits_fn: Callable[[list[int]], torch.Tensor], windows: Sequence[list[int]]):
    """exp(mean NLL) over `windows`; `logits_fn(ids)` returns logits [len(ids), vocab]."""
    total, count = 0.0, 0
    for ids in windows:
        logits = logits_fn(ids)[:-1].float()  # [n - 1, vocab]: position i predicts i + 1
        targets = torch.tensor(ids[1:], device=logits.device)
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


@torch.inference_mode()
def model_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """covey's logits [n, vocab] for one sequence, from a scratch KV cache of its length."""
    args = model.args
    weight = model.norm.weight  # the compute dtype and device (embeddings may be int8)
    n = len(ids)
    kv = torch.zeros(
        args.num_layers,
        2,
        args.num_kv_heads,
        n,
        args.dim_per_head,
        dtype=weight.dtype,
        device=weight.device,
    )
    positions = torch.arange(n, device=weight.device)
    meta = AttentionMetadata(
        slot_mapping=positions,
        num_decode=0,
        block_size=1,
        prefills=[PrefillRun(0, n, None, None)],
    )
    hidden = model(torch.tensor(ids, device=weight.device), positions, kv, meta)
    return model.compute_logits(hidden)


def model_perplexity(model: LlamaModel, windows: Sequence[list[int]]) -> float:
    """covey's perplexity over `windows` (see `heldout_windows`)."""
    return perplexity_of(lambda ids: model_logits(model, ids), windows)
