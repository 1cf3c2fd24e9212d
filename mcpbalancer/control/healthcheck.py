"""`mcpbalancer --config FILE --healthcheck`: is the proxy that FILE configures alive?

For container health checks (the Docker image's HEALTHCHECK), which run a command and read its exit
status: GET /healthz on the admin listener when there is one, else on the public listener; 0 when it
answers 200 within the timeout, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import http.client
import ssl
from typing import Final

from mcpbalancer.config import Config, host_port

TIMEOUT: Final = 3.0
# A listener on every address is reached on the loopback one.
_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def healthz_address(config: Config) -> tuple[str, int]:
    """Where /healthz is served: the admin listener (the supervisor's with workers), else the first
    plain public listener, else the first TLS one."""
    host, port = config.admin if config.admin is not None else _public(config)[:2]
    return _LOOPBACK.get(host, host), port


def _public(config: Config) -> tuple[str, int, bool]:
    listeners = config.all_listeners
    chosen = next((x for x in listeners if x.tls is None), listeners[0])
    return chosen.host, chosen.port, chosen.tls is not None


def check(config: Config, timeout: float = TIMEOUT) -> str | None:
    """None when /healthz answers 200, else what went wrong."""
    host, port = healthz_address(config)
    tls = config.admin is None and _public(config)[2]
    url = f"{'https' if tls else 'http'}://{host_port(host, port)}/healthz"
    if port == 0:
        return f"{url}: port 0 is picked at start-up and cannot be probed; give the listener a port"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    if tls:
        # Liveness, not identity: the certificate names the public host, not the loopback address.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{url}: {str(exc) or type(exc).__name__}"
    finally:
        connection.close()
    return None if response.status == 200 else f"{url}: HTTP {response.status}"
