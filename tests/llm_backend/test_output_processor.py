"""Output processing on its own: the real tokenizer, no model. Tokens are fed as if sampled."""

from __future__ import annotations

import pytest

from covey.llm_backend.choices import ChoiceTrie
from covey.llm_backend.output_processor import OutputProcessor
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.sequence import FinishReason, Sequence, SequenceStatus
from covey.llm_backend.tokenizer import load_default_tokenizer

COUNT = " 6, 7, 8, 9, 10, 11"


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


def feed(proc: OutputProcessor, seq: Sequence, ids: list[int]) -> list:
    """Append `ids` one by one, finishing as the engine does; stop at the first finish."""
    outs = []
    for t in ids:
        reason = proc.append_token(seq, t)
        if reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        outs.append(proc.output(seq, [t]))
        if outs[-1].finished:
            break
    return outs


def new_seq(tok, params: SamplingParams, prompt: str = "1, 2, 3, 4, 5,") -> Sequence:
    ids = tok.encode(prompt)
    return Sequence("r", ids, params)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_tokens_is_cut_and_never_streamed(tok, include):
    params = SamplingParams(stop=", 8,", include_stop_str_in_output=include)
    seq = new_seq(tok, params)
    outs = feed(OutputProcessor(tok, 8192), seq, tok.encode(COUNT))
    expected = " 6, 7, 8," if include else " 6, 7"
    assert outs[-1].finish_reason == "stop" and outs[-1].text == expected
    assert "".join(o.delta_text for o in outs) == expected
    assert all(o.delta_text == "" or ", 8," not in o.delta_text for o in outs[:-1])


def test_text_that_may_begin_a_stop_string_is_held_back(tok):
    seq = new_seq(tok, SamplingParams(stop="7, 9"))
    outs = feed(OutputProcessor(tok, 8192), seq, tok.encode(" 6, 7, 8"))
    assert not outs[-1].finished
    streamed = "".join(o.delta_text for o in outs)
    assert seq.output_text == " 6, 7, 8"
    assert streamed == " 6, 7"  # the last len("7, 9") - 1 characters wait


def test_eos_stop_token_ids_max_tokens_and_the_context_window(tok):
    proc = OutputProcessor(tok, 8192)
    ids = tok.encode(COUNT)
    eos = feed(proc, new_seq(tok, SamplingParams()), [ids[0], tok.eos_token_id, ids[1]])
    assert len(eos) == 2 and eos[-1].finish_reason == "stop"
    ignored = feed(proc, new_seq(tok, SamplingParams(ignore_eos=True, max_tokens=3)), [2, 2, 2])
    assert ignored[-1].finish_reason == "length" and len(ignored[-1].token_ids) == 3
    by_id = feed(proc, new_seq(tok, SamplingParams(stop_token_ids=[ids[2]])), ids)
    assert by_id[-1].finish_reason == "stop" and by_id[-1].token_ids == ids[:3]
    seq = new_seq(tok, SamplingParams())
    window = feed(OutputProcessor(tok, len(seq) + 2), seq, ids)
    assert window[-1].finish_reason == "length" and len(window) == 2


def test_a_choice_streams_whole_once_complete(tok):
    seq = new_seq(tok, SamplingParams(choices=["positive", "negative"]), "Sentiment:")
    seq.choice_trie = ChoiceTrie(seq.params.choices, tok.encode, tok.eos_token_id)
    outs = feed(OutputProcessor(tok, 8192), seq, tok.encode("negative"))
    assert [o.delta_text for o in outs[:-1]] == [""] * (len(outs) - 1)
    assert outs[-1].delta_text == outs[-1].text == "negative"
    assert outs[-1].finish_reason == "stop"


def test_a_character_split_across_tokens_is_released_whole(tok):
    text = " naïve café 🎉 done"
    seq = new_seq(tok, SamplingParams())
    outs = feed(OutputProcessor(tok, 8192), seq, tok.encode(text))
    assert all("\ufffd" not in o.delta_text for o in outs)
    assert "".join(o.delta_text for o in outs) == text == outs[-1].text


def test_an_aborted_or_failed_request_releases_what_was_held(tok):
    seq = new_seq(tok, SamplingParams(stop="never seen"))
    proc = OutputProcessor(tok, 8192)
    held = "".join(o.delta_text for o in feed(proc, seq, tok.encode(" 6, 7")))
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ERROR
    last = proc.output(seq, [], error="RuntimeError: boom")
    assert held + last.delta_text == " 6, 7"
    assert last.finish_reason == "error" and last.error == "RuntimeError: boom"
