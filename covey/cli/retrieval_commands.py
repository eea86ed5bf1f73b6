"""`covey index` and `covey search`: build an index from files, query it from the shell."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from covey.retrieval.searcher import DEFAULT_K, DEFAULT_MODE, MODES

if TYPE_CHECKING:
    from covey.retrieval.document_index import DocumentIndex

SNIPPET_CHARS = 240
# `covey index` options that only a new index takes (what an existing one has is kept)
CREATION_SETTINGS = ("chunk_tokens", "overlap_tokens", "kind")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="ingest text, Markdown and HTML files or folders into an index; or --verify or "
        "--repair one",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders to ingest")
    p.add_argument("--index", metavar="DIR", help="index directory")
    p.add_argument(
        "--chunk-tokens", type=int, default=None, help="tokens per chunk (new index; default 200)"
    )
    p.add_argument(
        "--overlap-tokens", type=int, default=None, help="overlap (new index; default 32)"
    )
    p.add_argument(
        "--kind",
        default=None,
        choices=("auto", "flat", "ivf", "hnsw"),
        help="faiss index (new index; default auto)",
    )
    p.add_argument("--embedder", default=None, help="sentence-transformers folder (new index)")
    p.add_argument(
        "--checkpoint-chunks",
        type=int,
        default=None,
        metavar="N",
        help="commit after every N new chunks, so an interrupted ingest resumes (default 2048)",
    )
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=None,
        metavar="S",
        help="also commit once S seconds passed since the last commit (default 300)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verify", metavar="DIR", help="check every version of the index in DIR")
    p.add_argument(
        "--repair", metavar="DIR", help="restore the newest consistent version of the index in DIR"
    )
    p.set_defaults(func=run_index)

    s = subparsers.add_parser("search", help="search an index (default: the Python docs)")
    s.add_argument("query", help="what to look for")
    s.add_argument("--index", default=None, metavar="DIR", help="index directory")
    s.add_argument("-k", type=int, default=DEFAULT_K, help="number of results")
    s.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    s.add_argument("--source", action="append", default=None, help="only this source (glob ok)")
    s.set_defaults(func=run_search)


class _WarningPrinter(logging.Handler):
    """Retrieval warnings (skipped files, recovered damage) as `covey: warning: ...`, once
    each: the one place they are printed, looked up on sys.stderr at each message."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"covey: warning: {record.getMessage()}", file=sys.stderr)


def _print_retrieval_warnings() -> None:
    logger = logging.getLogger("covey.retrieval")
    if not any(isinstance(h, _WarningPrinter) for h in logger.handlers):
        logger.addHandler(_WarningPrinter(logging.WARNING))


def _open_for_ingest(args: argparse.Namespace):
    from covey.retrieval.chunker import ChunkerConfig
    from covey.retrieval.document_index import DocumentIndex
    from covey.retrieval.embedder import Embedder, EmbedderConfig
    from covey.retrieval.store import index_exists
    from covey.retrieval.vector_index import IndexConfig

    def embedder():  # None: the bundled one, which create() loads after its cheap checks
        return Embedder.load(EmbedderConfig(model=args.embedder)) if args.embedder else None

    root = Path(args.index)
    chosen = {name: getattr(args, name) for name in CREATION_SETTINGS}
    chosen = {name: value for name, value in chosen.items() if value is not None}
    if index_exists(root):  # also an index whose manifest is lost: open() recovers it
        index = DocumentIndex.open(root, embedder=embedder())
        _refuse_other_settings(index, chosen)
        return index
    chunker = ChunkerConfig(**{k: v for k, v in chosen.items() if k != "kind"})
    index_config = IndexConfig(**{k: v for k, v in chosen.items() if k == "kind"})
    return DocumentIndex.create(root, embedder=embedder(), chunker=chunker, index=index_config)


def _refuse_other_settings(index: DocumentIndex, chosen: dict[str, int | str]) -> None:
    """Chunking and the faiss kind are fixed when an index is created: an option asking for
    other values on an existing one would be ignored (and the summary would contradict it).
    The same values pass, so re-running the command that created the index still works."""
    from covey.cli.engine_args import flag_list
    from covey.errors import InvalidRequestError

    built = {**asdict(index.chunker), "kind": index.index_config.kind}
    differ = [name for name, value in chosen.items() if value != built[name]]
    if differ:
        asked = ", ".join(f"{flag_list([name])} {chosen[name]}" for name in differ)
        has = ", ".join(f"{flag_list([name])} {built[name]}" for name in differ)
        raise InvalidRequestError(
            f"{asked}: the index at {index.root} was created with {has}, and these are "
            "chosen at creation; leave them out, or index into a new folder"
        )


def _check_index_args(args: argparse.Namespace) -> None:
    from covey.errors import InvalidRequestError

    health = [flag for flag in ("verify", "repair") if getattr(args, flag)]
    if len(health) == 2:
        raise InvalidRequestError("give --verify DIR or --repair DIR, not both")
    if health and (args.paths or args.index):
        raise InvalidRequestError(f"--{health[0]} DIR takes no PATH and no --index")
    if not health and not (args.paths and args.index):
        raise InvalidRequestError(
            "covey index needs PATH... and --index DIR (or --verify DIR, or --repair DIR)"
        )
    for flag in ("checkpoint_chunks", "checkpoint_seconds"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise InvalidRequestError(f"--{flag.replace('_', '-')} must be > 0, got {value}")


def run_index(args: argparse.Namespace) -> int:
    _check_index_args(args)
    _print_retrieval_warnings()
    if args.verify or args.repair:
        return _run_health(args)
    from covey.retrieval.document_index import CHECKPOINT_CHUNKS, CHECKPOINT_SECONDS
    from covey.retrieval.loaders import load_paths

    report = load_paths(args.paths)  # fails fast on a missing path, before loading models
    index = _open_for_ingest(args)
    stats = index.add_documents(
        report.documents,
        not args.quiet,
        args.checkpoint_chunks if args.checkpoint_chunks is not None else CHECKPOINT_CHUNKS,
        args.checkpoint_seconds if args.checkpoint_seconds is not None else CHECKPOINT_SECONDS,
    )
    m = index.manifest
    print(
        f"files: {stats.documents} read, {stats.unchanged} unchanged, {stats.replaced} "
        f"replaced, {len(report.skipped)} skipped, {len(report.aliases)} aliases\n"
        f"chunks: {stats.added_chunks} added ({stats.embedded_chunks} embedded, "
        f"{stats.reused_vectors} reused), {stats.removed_chunks} removed ({stats.tokens} "
        f"tokens), {stats.checkpoints} checkpoints\n"
        f"index: {index.root} holds {m['num_chunks']} chunks, {m['num_tokens']} tokens from "
        f"{m['num_sources']} sources; faiss {m['index']['kind']}"
        + (f", recall@10 {m['index']['recall_at_10']:.3f}" if "recall_at_10" in m["index"] else "")
    )
    return 0


def _run_health(args: argparse.Namespace) -> int:
    from covey.errors import RetrievalError
    from covey.retrieval.index_health import repair_index, verify_index

    root = Path(args.verify or args.repair)
    report = verify_index(root) if args.verify else repair_index(root)
    for line in report.lines:
        print(line)
    if args.verify and report.problems:
        raise RetrievalError(
            f"index {root} has {report.problems} problem(s); run `covey index --repair {root}`"
        )
    return 0


def run_search(args: argparse.Namespace) -> int:
    from covey.retrieval.search import validate_request

    validate_request(args.query, args.k, args.mode)  # before the seconds of model loading
    _print_retrieval_warnings()
    if args.index is None:
        from covey.retrieval.default_corpus import ensure_default_index

        index = ensure_default_index()
    else:
        from covey.retrieval.document_index import DocumentIndex

        index = DocumentIndex.open(args.index)
    results = index.search(args.query, k=args.k, mode=args.mode, sources=args.source)
    if not results:
        print("no results")
    for rank, hit in enumerate(results, start=1):
        c = hit.chunk
        snippet = " ".join(c.text.split())
        if len(snippet) > SNIPPET_CHARS:
            snippet = snippet[: SNIPPET_CHARS - 3] + "..."
        print(f"{rank}. score={hit.score:.4f}  {c.source} [{c.start}:{c.end}]  id={c.id[:12]}")
        print(f"   {snippet}")
    return 0
