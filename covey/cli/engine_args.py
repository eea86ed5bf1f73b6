"""Command-line options shared by every subcommand that runs the engine."""

from __future__ import annotations

import argparse
import re
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covey.errors import EngineError
from covey.llm_backend.sampling_params import SamplingParams

if TYPE_CHECKING:
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.engine_client import Prompt
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.llm_backend.outputs import RequestOutput

# EngineConfig's CHUNK_CACHE_MODES, written out: importing the config pulls in torch, and
# `covey --help` should stay quick (a test checks the two agree).
CHUNK_CACHE_CHOICES = ("off", "exact", "blend")
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
CHUNK_STORE_FIELDS = (
    "chunk_cache",
    "chunk_store_bytes",
    "chunk_store_dir",
    "chunk_store_disk_bytes",
)
MAX_SIZE = 1 << 50  # 1PiB: past any machine's memory or disk, so a larger one is a typo
_SIZE = re.compile(r"\s*(-?)([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


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


def parse_size(text: str) -> int:
    """A byte count for argparse's `type=`: plain bytes (`2147483648`) or a number with a
    binary unit (KiB, MiB, GiB, TiB: powers of 1024, as in `512MiB`) or a decimal one (kB, MB,
    GB, TB: powers of 1000, as in `500MB`), any case. Exact (`1.5GiB` is computed as a
    fraction, not in floating point); whole bytes only, at most MAX_SIZE. A bad value is
    argparse's usage error (exit 2), never a traceback."""
    match = _SIZE.fullmatch(text)
    unit = SIZE_UNITS.get(match[3].lower()) if match else None
    if unit is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: give bytes (2147483648) or a number with a unit "
            "(512MiB, 2GiB; binary KiB, MiB, GiB, TiB or decimal kB, MB, GB, TB)"
        )
    size = Fraction(match[2]) * unit
    if match[1] and size:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must not be negative")
    if size.denominator != 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: not a whole number of bytes")
    if size > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: at most 1PiB ({MAX_SIZE} bytes)")
    return int(size)


def parse_positive_size(text: str) -> int:
    """`parse_size` for a capacity where 0 is meaningless (a store that holds nothing): 0 is
    argparse's usage error too, with the reason."""
    size = parse_size(text)
    if size == 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be above 0")
    return size


def add_chunk_store_args(parser: argparse.ArgumentParser) -> None:
    """The chunk KV reuse options, on the commands whose prompts carry retrieved chunks
    (`covey serve`, which with --ray hands them to each replica, and `covey chat --docs`);
    `covey generate` and plain chat send none, so they do not take them. Left unset,
    EngineConfig's defaults hold."""
    parser.add_argument(
        "--chunk-cache",
        choices=CHUNK_CACHE_CHOICES,
        default=None,
        help="reuse retrieved chunks' KV: off, exact (only after the same text as before) or "
        "blend (also at other positions, a few tokens recomputed; the default)",
    )
    parser.add_argument(
        "--chunk-store-bytes",
        type=parse_positive_size,
        default=None,
        metavar="SIZE",
        help="host memory for the chunk KV store, per engine (per replica with --ray): "
        "bytes or a size such as 512MiB or 2GiB (KiB..TiB are binary, kB..TB decimal; "
        "default 2GiB). Above 0: new chunk KV is kept in host memory first, and the disk "
        "tier only takes what host memory evicts",
    )
    parser.add_argument(
        "--chunk-store-dir",
        default=None,
        metavar="DIR",
        help="also keep chunk KV in this folder, kept across restarts (default: none)",
    )
    parser.add_argument(
        "--chunk-store-disk-bytes",
        type=parse_positive_size,
        default=None,
        metavar="SIZE",
        help="with --chunk-store-dir: the most it holds, a size as for --chunk-store-bytes "
        "(default 2GiB)",
    )


def chunk_store_given(args: argparse.Namespace) -> dict[str, Any]:
    """The chunk options given, as EngineConfig fields, unchecked; unset ones (or a command
    without them) are left out."""
    fields = {name: getattr(args, name, None) for name in CHUNK_STORE_FIELDS}
    return {name: value for name, value in fields.items() if value is not None}


def chunk_store_config(args: argparse.Namespace, check_dir: bool = True) -> dict[str, Any]:
    """`chunk_store_given`, checked before any model loads: options that would do nothing
    are refused, and `check_dir` creates the --chunk-store-dir folder and writes a file in
    it (off where it lies on another machine: Ray replicas on a cluster joined by address)."""
    from covey.errors import ConfigError

    given = chunk_store_given(args)
    store = [name for name in CHUNK_STORE_FIELDS[1:] if name in given]
    if given.get("chunk_cache") == "off" and store:
        raise ConfigError(f"{flag_list(store)}: no chunk store with --chunk-cache off")
    if "chunk_store_disk_bytes" in given and "chunk_store_dir" not in given:
        raise ConfigError(goes_with(["chunk_store_disk_bytes"], "--chunk-store-dir"))
    if "chunk_store_dir" in given and check_dir:
        _check_writable_dir(given["chunk_store_dir"])
    return given


def _check_writable_dir(text: str) -> None:
    """The disk tier's folder can be created and written (else the error would come only
    after the model loads). An empty name is refused: Path("") is the current folder."""
    from covey.cache.disk_tier import file_in_the_way
    from covey.errors import ConfigError

    if not text.strip():
        raise ConfigError("--chunk-store-dir needs a folder name, got an empty one")
    path = Path(text).expanduser()
    blocker = file_in_the_way(path)
    if blocker is not None:
        inside = "" if blocker == path else f": {str(blocker)!r}"
        raise ConfigError(f"--chunk-store-dir {text!r}{inside} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--chunk-store-dir {text!r} cannot be created or written: {e}") from None


def flag_list(names: list[str] | tuple[str, ...]) -> str:
    """Option names as the user typed them (`chunk_store_dir` -> `--chunk-store-dir`), joined
    for an error message."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


def goes_with(names: list[str] | tuple[str, ...], needed: str) -> str:
    """The message for options given without the one they need: "--a, --b go with --x"."""
    return f"{flag_list(names)} go{'es' if len(names) == 1 else ''} with {needed}"


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


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the engine options describe (checked here, before any model loads)."""
    from covey.llm_backend.config import EngineConfig

    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        **chunk_store_config(args),
    )


def build_engine(args: argparse.Namespace) -> LLMEngine:
    from covey.llm_backend.llm_engine import LLMEngine

    return LLMEngine(engine_config(args))


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
