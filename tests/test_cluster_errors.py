"""The cluster's front door keeps the gateway's error contract: the whole bad-input table of
tests/test_errors_e2e.py, re-run against `serve --cluster ray` (a local Ray the gateway
starts) with the same registry. Its tests are imported, so pytest collects them again
here, where the `gateway` fixture below stands in for theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Gateway
from tests.test_errors_e2e import *  # noqa: F403  (every test of the table, collected here)
from tests.test_errors_e2e import errors_config

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]


@pytest.fixture(scope="module")  # type: ignore[no-redef]
def gateway(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The cluster front door, standing in for the imported module's fixture."""
    config = errors_config(tiny_model, tmp_path_factory.mktemp("errors"))
    with Gateway(config, args=["--cluster", "ray"], healthy_within_s=90) as gw:
        gw.client.timeout = 180.0
        yield gw
