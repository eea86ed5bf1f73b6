"""Deploying engine replicas on a cluster that already runs some: a second front must not
replace the first one's replicas (nor later delete them on its close)."""

from __future__ import annotations

import pytest
from ray import serve

from covey.errors import ConfigError
from covey.server.ray_deployment import deploy_replicas


def test_a_second_front_cannot_deploy_over_the_replicas_of_the_first(ray_replicas):
    before = {name: app.last_deployed_time_s for name, app in _apps().items()}
    names = ", ".join(sorted(ray_replicas))
    with pytest.raises(ConfigError, match=f"Ray Serve already runs {names}"):
        deploy_replicas(len(ray_replicas), None, {"device": "cpu"}, threads=1)
    after = {name: app.last_deployed_time_s for name, app in _apps().items()}
    assert after == before  # nothing was redeployed


def _apps():
    return serve.status().applications
