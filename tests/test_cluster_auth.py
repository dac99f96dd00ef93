"""The cluster's front door keeps the gateway's auth: the HTTP tests of tests/test_auth.py,
re-run against `serve --cluster ray` (a local Ray the gateway starts) with the same
registry and keys. The tests are imported, so pytest collects them again here, where the
`gateway` fixture below stands in for theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Gateway
from tests.test_auth import (  # noqa: F401  (collected here)
    auth_config,
    test_a_cors_preflight_needs_no_key_and_names_the_origin,
    test_a_wrong_key_is_401,
    test_an_api_key_is_403_on_admin_routes_and_an_admin_key_opens_them,
    test_an_api_key_opens_the_api,
    test_health_and_ready_stay_open,
    test_without_a_key_every_route_but_health_is_401,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    config, env = auth_config(tiny_model, tmp_path_factory.mktemp("auth"))
    with Gateway(config, env=env, args=["--cluster", "ray"], healthy_within_s=90) as gw:
        gw.client.timeout = 180.0
        yield gw
