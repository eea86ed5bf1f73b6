"""The text of an engine prompt as the model reads it, for `record_prompts`.

A rendered prompt is a string (chat templates, remote engines) or a list of `Segment`s
(static text, retrieved chunks, inputs, and earlier gens' outputs kept as token ids so they
are never re-tokenized). Recording the exact prompt means joining those pieces in order and
decoding the token-id pieces with the model's own tokenizer, special tokens included: what
a user debugging a template needs to see is every character, trailing spaces too.
"""

from __future__ import annotations

from typing import Any

from covey.llm_backend.segments import Segment


def prompt_text(prompt: Any, tokenizer: Any) -> str:
    """The whole prompt as one string; token ids without a tokenizer to decode them show as
    a `<N token ids>` placeholder."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Segment):
        prompt = [prompt]
    if isinstance(prompt, list | tuple) and all(isinstance(s, Segment) for s in prompt):
        return "".join(_segment_text(s, tokenizer) for s in prompt)
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return _ids_text(list(prompt), tokenizer)
    return str(prompt)


def _segment_text(seg: Segment, tokenizer: Any) -> str:
    if seg.text is not None:
        return seg.text
    return _ids_text(list(seg.token_ids or ()), tokenizer)


def _ids_text(ids: list[int], tokenizer: Any) -> str:
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return f"<{len(ids)} token ids>"
    try:
        return decode(ids, skip_special_tokens=False)
    except TypeError:  # a tokenizer whose decode takes no such option
        return decode(ids)
