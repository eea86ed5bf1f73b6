"""`covey serve --ray`'s options are checked before anything starts (no Ray needed)."""

from __future__ import annotations

import pytest

from covey.cli.main import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "3"], "--replicas and --address go with --ray"),
        (["--address", "ray://head:10001"], "--replicas and --address go with --ray"),
        (["--ray", "--routing", "random"], "--routing must be one of cache_aware"),
        (["--ray", "--replicas", "0"], "must be at least 1"),
        (["--ray", "--remote", "http://127.0.0.1:9"], "give --ray or --remote, not both"),
    ],
)
def test_serve_ray_options_are_checked_first(capsys, argv, message):
    code = main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
