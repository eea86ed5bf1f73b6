"""`--compile/--no-compile`, and the default on a machine that cannot compile: the decode
step runs eagerly after one warning, where an explicit `--compile` is a one-line error.

The machine without a C++ compiler is made for real: the child's CXX names no program
(inductor's CPU code generation needs one) and its inductor cache is empty, so nothing
compiled before can be loaded instead."""

from __future__ import annotations

import pytest

from covey.cli.main import build_parser
from tests.cli.runner import covey


@pytest.mark.parametrize(("flag", "value"), [([], None), (["--compile"], True),
                                             (["--no-compile"], False)])
@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"]])
def test_compile_flag_is_tri_state(command, flag, value):
    args = build_parser().parse_args([*command, *flag])
    assert args.compile is value


def _without_a_compiler(tmp_path) -> dict[str, str]:
    return {
        "CXX": str(tmp_path / "no-such-g++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "COVEY_COMPILE": "",  # the suite's 0 off: the default tries to compile
    }


def test_the_default_decodes_eagerly_with_a_warning_where_it_cannot_compile(tmp_path):
    env = _without_a_compiler(tmp_path)
    args = ("generate", "Hello", "--model", "dummy:tiny", "--max-tokens", "4", "--dtype",
            "bfloat16")
    out = covey(*args, **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # it answered
    warnings = [line for line in out.stderr.splitlines() if "decode step failed" in line]
    assert len(warnings) == 1, out.stderr
    assert "runs eagerly" in warnings[0] and "InvalidCxxCompiler" in warnings[0]
    assert "Traceback" not in out.stderr

    asked = covey(*args, "--compile", **env)
    assert asked.returncode == 1, asked.stderr
    (line,) = [ln for ln in asked.stderr.splitlines() if ln.startswith("covey: error:")]
    assert "compile=True, but torch.compile failed" in line and "Traceback" not in asked.stderr
