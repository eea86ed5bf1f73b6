"""Token selection from logits: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covey.llm_backend.sampling_params import SamplingParams


@dataclass
class Samples:
    """One step's picks. A row whose sampling raised has no token and says why in
    `errors`: it fails alone, and the other rows' generators are not drawn twice."""

    tokens: list[int | None]  # one per row
    errors: dict[int, Exception] = field(default_factory=dict)  # row -> why it failed


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> Samples:
    """logits [N, V] float32 -> one token id per row; greedy rows skip the softmax."""
    out = Samples(logits.argmax(dim=-1).tolist())
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            try:
                out.tokens[row] = _sample_row(logits[row], p, gen)
            except Exception as exc:  # this row's failure, whatever it is, is only its own
                out.tokens[row] = None
                out.errors[row] = exc
    return out


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
