"""Token healing: a prompt that ends inside a token is backed up one token.

Why: tokenizers merge a space with the word after it (" Paris" is one token), so a prompt
ending in "Category: " ends on a lone-space token that the model almost never saw before a
word; what follows it is out of distribution (the issue saw '202', '3.4'). Healing removes
that last token and constrains the first generated token to start with its text, so the
model may pick " Paris" (the space and the word as one token), as in its training data.
The removed text belongs to the prompt, so it is not part of the output text.

For choices, the removed text is put in front of every option before tokenizing it (the
option "hardware" after "Category: " is scored as the token " hardware").

A prompt's last token is healed only when some other token starts with its text (else the
prompt ends on a token boundary anyway), never inside a chunk segment (its KV is reused by
token ids) and never when it is the prompt's only token. Token texts come from decoding
each id alone, which is exact for byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3,
Qwen); a SentencePiece tokenizer (Llama 2, Mistral) drops a leading space when a token is
decoded alone, so healing there would match the wrong tokens: such a tokenizer is refused
with an InvalidRequestError (`check_healable`). A token that is only part of a multi-byte
character (emoji and some CJK characters are split into byte tokens) decodes alone to a
replacement character: a prompt ending on one is not healed.

The texts of the whole vocabulary are decoded once per tokenizer, on the first request
that asks for healing, on the thread that adds it: for SmolLM2's 49k tokens 0.3-0.5 s
(measured on a loaded 2-core machine); a 128k vocabulary takes proportionally longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from covey.errors import InvalidRequestError
from covey.llm_backend.segments import SegmentSpan
from covey.llm_backend.tokenizer import Tokenizer


@dataclass(frozen=True)
class Healing:
    """`text`: the removed token's text, which the output must start with; `allowed`: the
    token ids whose text starts with it (what the first output token may be)."""

    text: str
    allowed: tuple[int, ...]


# Words whose tokens, decoded one by one, spell the text again only when token texts are
# exact (byte-level BPE): a SentencePiece tokenizer loses the spaces between them.
_PROBE = "one two three"


@lru_cache(maxsize=4)
def check_healable(tokenizer: Tokenizer) -> None:
    """Refuse healing with a tokenizer whose lone token texts are not exact (see the module
    docstring); checked once per tokenizer."""
    ids = tokenizer.encode(_PROBE)
    if "".join(tokenizer.decode([i]) for i in ids) != tokenizer.decode(ids):
        raise InvalidRequestError(
            "token_healing needs a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM); "
            "this model's tokenizer drops a token's leading space when it is decoded alone"
        )


@lru_cache(maxsize=4)
def token_texts(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Every token id's text, decoded alone (special tokens as ""); computed once."""
    ids = [[i] for i in range(tokenizer.vocab_size)]
    return tuple(tokenizer.hf.batch_decode(ids, skip_special_tokens=True))


@lru_cache(maxsize=256)
def _starting_with(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
    """The token ids whose text starts with `text` (a scan of the vocabulary, kept: a
    template heals the same few texts again and again)."""
    return tuple(i for i, t in enumerate(token_texts(tokenizer)) if t.startswith(text))


def heal(
    tokenizer: Tokenizer, ids: list[int], spans: list[SegmentSpan]
) -> tuple[list[int], list[SegmentSpan], Healing] | None:
    """The prompt without its last token, its spans trimmed to match, and the healing to
    apply; None when there is nothing to heal (see the module docstring). Raises
    InvalidRequestError for a tokenizer healing cannot work with."""
    check_healable(tokenizer)
    if len(ids) < 2 or (spans and spans[-1].kind == "chunk"):
        return None
    texts = token_texts(tokenizer)
    last = ids[-1]
    removed = texts[last] if last < len(texts) else ""
    if not removed or "\ufffd" in removed:
        # A token that is part of a multi-byte character has no text of its own: healing
        # would constrain the output to every token whose text is a replacement character.
        return None
    allowed = _starting_with(tokenizer, removed)
    if allowed == (last,):
        return None
    end = len(ids) - 1
    trimmed = [
        SegmentSpan(s.kind, s.start, min(s.end, end), s.chunk_id) for s in spans if s.start < end
    ]
    return ids[:-1], trimmed, Healing(removed, allowed)
