from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

pytest_plugins = [
    "tests.fixtures.backends",
    "tests.fixtures.redis",
    "tests.fixtures.redis_ha",
    "tests.fixtures.proxy",
    "tests.fixtures.stub",
    "tests.fixtures.rawhttp",
    "tests.fixtures.mcp",
    "tests.fixtures.tls",
    "tests.fixtures.idp",
    "tests.fixtures.dns",
    "tests.fixtures.cluster",
]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The data plane is built for uvloop; test it on the loop it runs on in production.
    return {"uvloop": uvloop.new_event_loop}
