"""The front door: the Host allow list and the Origin policy, as one early_request filter.

Both look at every request head, and almost every head passes both: a known Host and no Origin.
As one filter that case costs a request one call and two tests, where two filters in a row would
cost three calls.
"""

from __future__ import annotations

from mcpbalancer.filters.hosts import HostFilter
from mcpbalancer.filters.origin import OriginFilter
from mcpbalancer.filters.phases import MutableHead, Verdict


class FrontDoor:
    def __init__(self, hosts: HostFilter | None, origins: OriginFilter) -> None:
        self._hosts = hosts  # None when every Host is allowed
        self._known = hosts.policy.known if hosts is not None else None
        self._origins = origins

    @property
    def checks_host(self) -> bool:
        """False when `allowed_hosts` allows every Host: then no Host test is made at all."""
        return self._hosts is not None

    def early_request(self, head: MutableHead) -> Verdict | None:
        known, host = self._known, head.host
        if known is not None and host is not None and host not in known:
            assert self._hosts is not None
            refused = self._hosts.early_request(head)
            if refused is not None:
                return refused
        return None if head.origin is None else self._origins.early_request(head)
