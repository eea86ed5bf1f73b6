"""Suite-wide settings: caches under a temporary home, offline hub, and the eager decode
step by default (COVEY_COMPILE=0 unless the run sets it: `COVEY_COMPILE=1 pytest ...` runs
the engines on the compiled default instead)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The engine's default compiles its decode step on CPU (seconds of tracing per engine even
# from a warm cache); the suite builds well over a hundred engines, so here the default is
# eager. Set at import, before any engine is built, and inherited by every child process
# (the CLI's, servers', Ray's). Tests of the compiled step ask for it (compile=True), and
# tests of the default itself unset this. A default, not an override: `COVEY_COMPILE=1
# pytest tests/server` runs those tests on the compiled default (slow: every engine traces),
# which nothing else in the suite does end to end.
os.environ.setdefault("COVEY_COMPILE", "0")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    ),
]


@pytest.fixture(scope="session", autouse=True)
def covey_home(tmp_path_factory):
    """Keep caches (tokenizer files, indexes) of a test run away from the user's home."""
    home = os.environ.get("COVEY_TEST_HOME") or str(tmp_path_factory.mktemp("covey-home"))
    os.environ["COVEY_HOME"] = home
    return home
