"""Replacing a file so that a crash leaves the old version or the new one, never half of
each: write a temporary file beside it, then rename it over the target (a rename within one
folder is atomic on POSIX). Files that are replaced in place (the index manifest of
`covey.retrieval.store`, the entries of `covey.cache.disk_tier`, the measured profiles of
`covey.llm_backend.prefill_profile`) go through here, so the
rule is written once. A folder written whole and then renamed to a name not yet taken
needs no helper and does its own rename: the index versions of `covey.retrieval.store`
and the GGUF tokenizer cache of `covey.llm_backend.tokenizer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so a rename in it survives a
    power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(
    path: Path, write: Callable[[Path], None], tmp: Path, durable: bool = False
) -> None:
    """`write(tmp)`, then move `tmp` over `path`. On any error `tmp` is removed and the
    error raised, and `path` is untouched. `durable`: fsync the data before the rename and
    the folder after it (the index's commit point needs it; a cache does not)."""
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
