"""`mcpbalancer --config FILE --healthcheck`: is the proxy that FILE configures alive?

For container health checks (the Docker image's HEALTHCHECK), which run a command and read its exit
status: GET /healthz on the admin listener when there is one, else on the public listener; 0 when it
answers 200 within the timeout, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import http.client
from typing import Final

from mcpbalancer.config import Config, host_port

TIMEOUT: Final = 3.0
# A listener on every address is reached on the loopback one.
_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def healthz_address(config: Config) -> tuple[str, int]:
    """Where /healthz is served: the admin listener (the supervisor's with workers), else the public
    one."""
    host, port = config.admin if config.admin is not None else (config.listen_host, config.listen_port)
    return _LOOPBACK.get(host, host), port


def check(config: Config, timeout: float = TIMEOUT) -> str | None:
    """None when /healthz answers 200, else what went wrong."""
    host, port = healthz_address(config)
    url = f"http://{host_port(host, port)}/healthz"
    if port == 0:
        return f"{url}: port 0 is picked at start-up and cannot be probed; give the listener a port"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{url}: {str(exc) or type(exc).__name__}"
    finally:
        connection.close()
    return None if response.status == 200 else f"{url}: HTTP {response.status}"
