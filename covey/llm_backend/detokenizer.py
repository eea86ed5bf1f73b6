"""Incremental detokenization: text deltas per step without re-decoding everything.

A token can end mid-character (byte-level BPE); text is released only once the decoded
window no longer ends in a replacement character.
"""

from __future__ import annotations

from covey.llm_backend.sequence import Sequence
from covey.llm_backend.tokenizer import Tokenizer


def detokenize_step(tokenizer: Tokenizer, seq: Sequence) -> str:
    """Append newly readable text of `seq` to `seq.output_text`; return that delta.

    Mutates `seq.output_text`, `seq.prefix_offset` and `seq.read_offset`.
    """
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset])
    full_text = tokenizer.decode(ids[seq.prefix_offset :])
    if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
        return ""
    delta = full_text[len(prefix_text) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.output_text += delta
    return delta
