"""Token selection from logits: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from covey.llm_backend.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [N, V] float32 -> one token id per row; greedy rows skip the softmax."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    scaled = logits / p.temperature  # [V]
    if p.top_k and p.top_k < scaled.shape[-1]:
        values, order = torch.topk(scaled, p.top_k)  # [k], sorted: only k to sort for top-p
    elif p.top_p == 1.0:
        values, order = scaled, None  # plain temperature sampling needs no sort
    else:
        values, order = scaled.sort(descending=True)  # [V]
    probs = torch.softmax(values, dim=-1)
    if p.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= p.top_p, 0.0)
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    pick = int(torch.multinomial(probs, 1, generator=gen).item())
    return pick if order is None else int(order[pick].item())
