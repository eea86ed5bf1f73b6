"""Command-line options shared by every subcommand that runs the engine."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from covey.errors import EngineError
from covey.llm_backend.sampling_params import SamplingParams

if TYPE_CHECKING:
    from covey.llm_backend.engine_client import Prompt
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.llm_backend.outputs import RequestOutput


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """`--compile/--no-compile`, shared by every command that builds an engine."""
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run decode steps as one torch.compile graph (the first start compiles for "
        "minutes, cached under covey's home; later starts trace for seconds). Default: on "
        "for CPU unless COVEY_COMPILE=0, falling back to eager with a warning where it "
        "cannot compile; off on CUDA. --compile forces it (an error where it fails), "
        "--no-compile runs eagerly and starts fastest",
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a Hugging Face folder or dummy:PRESET "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    add_compile_arg(parser)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def build_engine(args: argparse.Namespace) -> LLMEngine:
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, compile=args.compile
    )
    return LLMEngine(config)


def stream_to(engine: LLMEngine, prompt: Prompt, params: SamplingParams, write) -> str:
    """Run one request to the end, writing text deltas as they come; return the text.

    Ctrl-C (or any error) aborts the request inside `run_to_completion`, freeing its KV."""
    rid = engine.add_request(prompt, params)

    def on_output(out: RequestOutput) -> None:
        if out.request_id == rid:
            write(out.delta_text)

    (final,) = engine.run_to_completion([rid], on_output=on_output)
    if final.error is not None:
        raise EngineError(f"generation failed: {final.error}")
    return final.text
