"""The compiled decode step (EngineConfig.compile) computes what the eager model does."""

from __future__ import annotations

import pytest
import torch

from covey.llm_backend.compiled_decode import inductor_cache_dir
from covey.llm_backend.sampling_params import SamplingParams
from covey.llm_backend.scheduler import ScheduledSeq

pytestmark = pytest.mark.slow  # the first compile takes tens of seconds (then it is cached)

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["The three primary colors are", "Python is a programming language that " * 8]


def test_compiled_and_eager_decode_agree(make_engine, device, covey_home):
    compiled = make_engine(compile=True)
    assert inductor_cache_dir().startswith(covey_home)  # cached under covey's home
    rids = [compiled.add_request(p, GREEDY) for p in PROMPTS]
    compiled.step()  # prefill both (eager): the next steps are pure decodes
    compiled.step()
    # One decode step's hidden states, both ways, on the same pool and metadata. The step
    # writes the same K/V to the same slots, so running it twice changes nothing.
    seqs = [compiled.requests[r] for r in rids]
    inputs = compiled.runner.prepare([ScheduledSeq(s, 1) for s in seqs])
    args = (inputs.input_ids, inputs.positions, compiled.pool.kv, inputs.meta)
    with torch.inference_mode():
        eager_hidden = compiled.model(*args)
        compiled_hidden = compiled.runner.compiled.forward(*args)
    torch.testing.assert_close(compiled_hidden, eager_hidden, rtol=1e-4, atol=1e-4)

    outs = [o.token_ids for o in compiled.run_to_completion(rids)]
    eager = make_engine()
    reference = eager.run_to_completion([eager.add_request(p, GREEDY) for p in PROMPTS])
    assert outs == [o.token_ids for o in reference]
