"""Token healing: a prompt ending inside a token is backed up one token, and the output is
made to start with the removed text."""

from __future__ import annotations

import pytest

from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.segments import SegmentSpan
from covey.llm_backend.token_healing import heal
from covey.llm_backend.tokenizer import load_default_tokenizer

HEALED = SamplingParams(max_tokens=3, token_healing=True)


def test_heal_backs_up_a_trailing_space_but_not_a_chunk_or_a_special_token():
    tok = load_default_tokenizer()
    ids = tok.encode("The capital of France is ")
    assert tok.decode(ids[-1:]) == " "
    healed = heal(tok, ids, [SegmentSpan("static", 0, len(ids))])
    assert healed is not None
    prompt, spans, healing = healed
    assert prompt == ids[:-1] and spans == [SegmentSpan("static", 0, len(ids) - 1)]
    assert healing.text == " " and tok.encode(" Paris")[0] in healing.allowed
    assert all(tok.decode([t]).startswith(" ") for t in healing.allowed[:50])
    assert heal(tok, ids, [SegmentSpan("chunk", 0, len(ids), "c")]) is None
    assert heal(tok, ids[:-1] + [tok.eos_token_id], []) is None  # decodes to nothing


def test_a_healed_prompt_generates_as_if_it_ended_on_the_token_boundary(make_engine):
    engine = make_engine()
    plain, healed, unhealed = [
        engine.run_to_completion([engine.add_request(prompt, params)])[0]
        for prompt, params in (
            ("The capital of France is", SamplingParams(max_tokens=3)),
            ("The capital of France is ", HEALED),
            ("The capital of France is ", SamplingParams(max_tokens=3)),
        )
    ]
    assert plain.text.startswith(" ")  # the model's own word boundary
    assert healed.token_ids == plain.token_ids  # the removed space came back in " word"
    assert healed.text == plain.text[1:]  # the space belongs to the prompt, not the output
    assert healed.healed_text == " " and plain.healed_text == ""
    assert healed.metrics.num_prompt_tokens == plain.metrics.num_prompt_tokens
    assert unhealed.token_ids != plain.token_ids  # what healing prevents


def test_healed_choices_are_tokenized_after_the_removed_text(make_engine):
    engine = make_engine()
    healing = SamplingParams(choices=("Paris", "London"), token_healing=True)
    prompts = [
        ("The capital of France is ", healing),
        ("The capital of France is", SamplingParams(choices=(" Paris", " London"))),
    ]
    healed, spaced = engine.run_to_completion([engine.add_request(*p) for p in prompts])
    assert healed.text == "Paris" and healed.token_ids == spaced.token_ids
    for city in ("Paris", "London"):
        expected = spaced.choice_logprobs[" " + city]
        assert healed.choice_logprobs[city] == pytest.approx(expected, abs=1e-4)


def test_a_prompt_ending_inside_a_multibyte_character_is_not_healed(make_engine):
    """The last token is part of an emoji's bytes: it has no text to heal with."""
    from covey.llm_backend.token_healing import heal, token_texts

    tok = make_engine().tokenizer
    ids = tok.encode("Weather today: \U0001f326")
    assert "\ufffd" in token_texts(tok)[ids[-1]]
    assert heal(tok, ids, []) is None


def sentencepiece_tokenizer():
    """A small real SentencePiece-style tokenizer (a Unigram model with Metaspace pieces, as
    Llama 2 and Mistral use): a token decoded alone loses its leading space."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from covey.llm_backend.tokenizer import Tokenizer

    pieces = ["<unk>", "</s>", "▁", "▁one", "▁two", "▁three", "▁answer", ":", "o", "n", "e"]
    raw = RawTokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    return Tokenizer(
        PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    )


def test_healing_with_a_sentencepiece_tokenizer_is_refused_in_one_line():
    from covey.errors import InvalidRequestError
    from covey.llm_backend.block_manager import BlockManager
    from covey.llm_backend.request_validator import RequestValidator

    tok = sentencepiece_tokenizer()
    ids = tok.encode("one two")
    assert [tok.decode([i]) for i in ids] == ["one", "two"]  # the space before "two" is lost
    validator = RequestValidator(tok, tok.vocab_size, 64, BlockManager(8, 16))
    with pytest.raises(InvalidRequestError, match="token_healing needs a byte-level BPE"):
        validator.check("one two ", HEALED, None, 0, set())
    plain = validator.check("one two ", SamplingParams(max_tokens=3), None, 0, set())
    assert plain.token_ids == tok.encode("one two ") and plain.healing is None
