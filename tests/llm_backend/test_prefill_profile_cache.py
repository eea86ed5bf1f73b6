"""Measured prefill and swap profiles are kept on disk, so later processes skip measuring."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from covey.llm_backend import prefill_profile as pp
from covey.llm_backend.model_args import preset
from covey.llm_backend.model_source import resolve_model
from covey.llm_backend.quantization import INT4_KERNEL_MAX_ROWS, KERNEL_MAX_ROWS, quantize
from covey.llm_backend.weight_loader import load_model

KEY = ("dummy:tiny", "preset:tiny", "cpu", torch.float32, None)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh covey home and empty in-process caches, as in a new process."""
    monkeypatch.setenv("COVEY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pp, "_profiles", {})
    monkeypatch.setattr(pp, "_swap_profiles", {})
    return tmp_path / "home"


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_model("dummy:tiny"), torch.float32, torch.device("cpu"))


def new_process(monkeypatch):
    """Forget the in-process fits; measuring again would fail the test."""
    monkeypatch.setattr(pp, "_profiles", {})
    monkeypatch.setattr(pp, "_swap_profiles", {})

    def no_measuring(*args):
        raise AssertionError("measured again although a stored profile fits")

    monkeypatch.setattr(pp, "measure", no_measuring)
    monkeypatch.setattr(pp, "measure_swap", no_measuring)


def test_a_later_process_reads_the_stored_profiles(home, model, monkeypatch):
    prefill = pp.prefill_profile(model, KEY)
    swap = pp.swap_profile(preset("tiny"), 16, torch.float32, torch.device("cpu"), (*KEY, 16))
    assert len(list((home / "profiles").glob("*.json"))) == 2
    new_process(monkeypatch)
    assert pp.prefill_profile(model, KEY) == prefill
    assert pp.swap_profile(preset("tiny"), 16, torch.float32, torch.device("cpu"), (*KEY, 16)) == (
        swap
    )


def test_what_the_speed_depends_on_keys_the_file(home, model, monkeypatch):
    pp.prefill_profile(model, KEY)
    threads = torch.get_num_threads()
    other_model = ("dummy:tiny", "preset:tiny", "cpu", torch.bfloat16, None)
    measured = []
    monkeypatch.setattr(pp, "_profiles", {})
    monkeypatch.setattr(pp, "measure", lambda m: measured.append(1) or pp.PrefillProfile(1, 1))
    pp.prefill_profile(model, other_model)
    torch.set_num_threads(threads + 1)
    try:
        pp.prefill_profile(model, KEY)
    finally:
        torch.set_num_threads(threads)
    assert len(measured) == 2
    assert len(list((home / "profiles").glob("prefill-*.json"))) == 3


@pytest.mark.parametrize(
    "content", ["", "{not json", '{"key": "other", "fit": {}}', "KEY_WITH_NEGATIVE_FIT"]
)
def test_a_corrupt_file_is_measured_again_and_replaced(home, model, monkeypatch, content):
    good = pp.prefill_profile(model, KEY)
    (path,) = (home / "profiles").glob("prefill-*.json")
    if content == "KEY_WITH_NEGATIVE_FIT":
        data = json.loads(path.read_text())
        data["fit"]["per_token_s"] = -1.0
        content = json.dumps(data)
    path.write_text(content)
    monkeypatch.setattr(pp, "_profiles", {})
    monkeypatch.setattr(pp, "measure", lambda m: good)
    assert pp.prefill_profile(model, KEY) == good
    assert json.loads(path.read_text())["fit"]["per_token_s"] == good.per_token_s
    assert not list(path.parent.glob("*.tmp*"))


def test_an_unwritable_home_only_costs_a_measurement(tmp_path, model, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("COVEY_HOME", str(blocker))
    monkeypatch.setattr(pp, "_profiles", {})
    profile = pp.prefill_profile(model, KEY)
    assert profile.per_token_s > 0


def test_a_profile_from_an_older_covey_is_measured_again(home, model, monkeypatch):
    pp.prefill_profile(model, KEY)
    monkeypatch.setattr(pp, "_profiles", {})
    monkeypatch.setattr(pp, "PROFILE_VERSION", pp.PROFILE_VERSION + 1)
    fresh = pp.PrefillProfile(0.5, 0.25)
    monkeypatch.setattr(pp, "measure", lambda m: fresh)
    assert pp.prefill_profile(model, KEY) == fresh
    assert len(list((home / "profiles").glob("prefill-*.json"))) == 2


def test_a_stale_profile_is_measured_again_and_rewritten(home, model, monkeypatch):
    pp.prefill_profile(model, KEY)
    (path,) = (home / "profiles").glob("prefill-*.json")
    old = time.time() - pp.PROFILE_MAX_AGE_S - 60
    os.utime(path, (old, old))
    monkeypatch.setattr(pp, "_profiles", {})
    fresh = pp.PrefillProfile(0.5, 0.25)
    monkeypatch.setattr(pp, "measure", lambda m: fresh)
    assert pp.prefill_profile(model, KEY) == fresh
    assert json.loads(path.read_text())["fit"]["per_token_s"] == 0.25
    assert time.time() - path.stat().st_mtime < 60
    new_process(monkeypatch)  # fresh again: read, not measured
    assert pp.prefill_profile(model, KEY) == fresh


def test_the_configured_thread_count_keys_the_file_not_the_governors(home, model, monkeypatch):
    """The thread governor moves torch's count with the load: two starts of one setup must
    still share one file."""
    threads = torch.get_num_threads()
    stored = pp.prefill_profile(model, KEY, threads=2)
    new_process(monkeypatch)
    torch.set_num_threads(threads + 1)
    try:
        assert pp.prefill_profile(model, KEY, threads=2) == stored
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_the_fit_spans_the_quantized_kernels_row_limit(mode):
    """Long prefills run past the weight-only kernel's row limit: the measured line must
    too, or it is the kernel's slope."""
    model = load_model(resolve_model("dummy:tiny"), torch.bfloat16, torch.device("cpu"))
    if mode:
        quantize(model, mode)
    widths = []
    model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda layer, args: widths.append(args[0].shape[0])
    )
    assert pp.measure(model).per_token_s > 0
    limit = {None: 0, "int8": KERNEL_MAX_ROWS, "int4": INT4_KERNEL_MAX_ROWS}[mode]
    assert min(widths) <= limit or mode is None
    assert max(widths) > limit and max(widths) >= max(pp.PROFILE_LENGTHS)
