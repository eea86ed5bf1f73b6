"""covey's engine against transformers on the embedded GGUF: same logits, same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans",
]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    src = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
    )
    return model.eval()


def test_logits_of_one_forward_match(make_engine, hf_model, device):
    engine = make_engine()
    ids = engine.tokenizer.encode(PROMPTS[0])
    engine.add_request(ids, SamplingParams(max_tokens=1), request_id="x")
    plan = engine.scheduler.schedule()
    _, logits = engine.runner.execute(plan.scheduled, plan.block_copies)
    engine.abort_request("x")
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(logits[0].cpu(), ref, atol=1e-3, rtol=1e-4)


def test_greedy_tokens_match_transformers(make_engine, hf_model):
    engine = make_engine()
    batch = [engine.tokenizer.encode(p) for p in PROMPTS]
    rids = [engine.add_request(ids, SamplingParams(max_tokens=24)) for ids in batch]
    ours = {out.request_id: out.token_ids for out in engine.run_to_completion(rids)}
    for rid, ids, prompt in zip(rids, batch, PROMPTS):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        assert ours[rid] == ref[0, len(ids) :].tolist(), prompt
