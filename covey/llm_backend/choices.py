"""Constrained choice: the output must be exactly one of a few strings (SGLang `select`,
vLLM `guided_choice`, Guidance `select`).

Each choice is tokenized once into a trie; at every step only the tokens that continue some
choice keep their logits, so greedy decoding picks the likeliest choice token by token and
sampling stays within the choices. A choice that is a prefix of another ends on EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from covey.errors import InvalidRequestError


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    choice: str | None = None  # set where a choice's tokens end


class ChoiceTrie:
    def __init__(
        self, choices: Sequence[str], encode: Callable[[str], list[int]], eos: int | None
    ) -> None:
        self.root = _Node()
        self.eos = eos
        self.max_tokens = 0
        for choice in choices:
            ids = encode(choice)
            if not ids:
                raise InvalidRequestError(f"choice {choice!r} has no tokens")
            node = self.root
            for t in ids:
                node = node.children.setdefault(t, _Node())
            if node.choice is not None and node.choice != choice:
                raise InvalidRequestError(
                    f"choices {node.choice!r} and {choice!r} tokenize the same; make them differ"
                )
            node.choice = choice
            self.max_tokens = max(self.max_tokens, len(ids) + 1)
        if eos is None and self._prefix_choice(self.root):
            raise InvalidRequestError(
                "one choice is a prefix of another, which needs an EOS token to end on; "
                "this model has no tokenizer"
            )

    def _prefix_choice(self, node: _Node) -> bool:
        if node.choice is not None and node.children:
            return True
        return any(self._prefix_choice(c) for c in node.children.values())

    def _walk(self, output: Sequence[int]) -> _Node | None:
        node = self.root
        for t in output:
            nxt = node.children.get(t)
            if nxt is None:
                return None
            node = nxt
        return node

    def allowed(self, output: Sequence[int]) -> list[int]:
        """Token ids that may come after `output` (the tokens generated so far)."""
        node = self._walk(output)
        if node is None:
            return []
        ids = list(node.children)
        if node.choice is not None and self.eos is not None:
            ids.append(self.eos)
        return ids

    def finished_choice(self, output: Sequence[int]) -> str | None:
        """The choice `output` completes: it ends on a choice with nothing longer, or ends
        on EOS right after one. None while more tokens must come."""
        if output and output[-1] == self.eos and self.eos is not None:
            node = self._walk(output[:-1])
            return node.choice if node is not None else None
        node = self._walk(output)
        if node is not None and node.choice is not None and not node.children:
            return node.choice
        return None

    def mask(self, logits: torch.Tensor, output: Sequence[int]) -> None:
        """Set every token that leaves the choices to -inf, in place; logits is [V]."""
        keep_only(logits, self.allowed(output))


def keep_only(logits: torch.Tensor, allowed: Sequence[int]) -> None:
    """Set every token but `allowed` to -inf, in place; logits is [V]. Constrained decoding
    (a choice's next tokens, token healing's first token) masks through here."""
    keep = torch.tensor(allowed, dtype=torch.long, device=logits.device)
    kept = logits[keep]
    logits.fill_(float("-inf"))
    logits[keep] = kept
