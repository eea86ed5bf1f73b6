"""Where covey keeps what it builds (indexes, tokenizer caches): one place for every layer."""

from __future__ import annotations

import os
from pathlib import Path


def covey_home() -> Path:
    """`$COVEY_HOME`, else ~/.cache/covey."""
    env = os.environ.get("COVEY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "covey"
