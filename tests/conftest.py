from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
