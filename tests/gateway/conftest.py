"""Fixtures for gateway tests: one real gateway process per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with zero config (SQLite + embedded storage) and fast protocol timers."""
    data_dir: Path = tmp_path_factory.mktemp("gateway")
    with gateway(data_dir, *FAST_TIMEOUTS) as proc:
        yield proc
