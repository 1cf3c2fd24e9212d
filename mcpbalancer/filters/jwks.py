"""The authorization server's signing keys (a JSON Web Key Set), for checking JWT bearer tokens.

A KeySet is one parsed JWKS: signature keys by `kid`, made into PyJWT keys per algorithm on first
use. Symmetric (`oct`) keys and keys for encryption (`use: enc`) are never used: a token is only
ever checked with a public key, for one of the configured asymmetric algorithms.

A JwksSource keeps a KeySet fresh from `jwks_url`: fetched at start, again every `jwks_refresh`
seconds, and when a token names a `kid` the set lacks (a rotation), but at most once per
`jwks_cooldown` seconds for those, so tokens with made-up kids cannot make the proxy hammer the
authorization server. Concurrent requests share one fetch. A failed fetch (the server down, a bad
answer) keeps the last good set, with a warning and `jwks_refreshes_total{result="error"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWKError, PyJWTError

from mcpbalancer.config import Config
from mcpbalancer.errors import ConfigError
from mcpbalancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

MAX_JWKS_BYTES: Final = 1024 * 1024
FETCH_TIMEOUT: Final = 5.0
_NO_KID: Final = ""


class KeySet:
    """The signature keys of one JWKS document."""

    def __init__(self, document: object, algorithms: Collection[str]) -> None:
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError('not a JWKS: expected an object with a "keys" list')
        self._algorithms = frozenset(algorithms)
        self._by_kid: dict[str, list[Mapping[str, Any]]] = {}
        for jwk in document["keys"]:
            if not isinstance(jwk, Mapping) or jwk.get("kty") in (None, "oct"):
                continue  # no symmetric key is ever a verification key here
            if jwk.get("use", "sig") != "sig":
                continue
            kid = jwk.get("kid")
            self._by_kid.setdefault(kid if isinstance(kid, str) else _NO_KID, []).append(jwk)
        self._made: dict[tuple[int, str], PyJWK | None] = {}
        self.fingerprint = json.dumps(self._by_kid, sort_keys=True, default=str)

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_kid.values())

    def knows(self, kid: str) -> bool:
        return kid in self._by_kid

    def find(self, kid: str | None, alg: str) -> list[PyJWK]:
        """The keys a token signed with `alg` under `kid` (None: every key) may be checked with."""
        if alg not in self._algorithms:
            return []
        jwks = (
            self._by_kid.get(kid, []) if kid is not None else [k for ks in self._by_kid.values() for k in ks]
        )
        return [key for jwk in jwks if (key := self._key(jwk, alg)) is not None]

    def _key(self, jwk: Mapping[str, Any], alg: str) -> PyJWK | None:
        if jwk.get("alg", alg) != alg:
            return None  # a key published for one algorithm is used for that one only
        slot = (id(jwk), alg)
        if slot not in self._made:
            try:
                self._made[slot] = PyJWK(dict(jwk), algorithm=alg)
            except (PyJWKError, PyJWTError, ValueError, TypeError):
                self._made[slot] = None  # another key type than `alg` needs (an RSA key for ES256)
        return self._made[slot]


def read_jwks_file(path: str, algorithms: Collection[str], *, key: str = "auth.jwks_file") -> KeySet:
    """A KeySet from a file; ConfigError naming `key` when it cannot be read or is not a JWKS."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        keys = KeySet(json.loads(data), algorithms)
    except ValueError as exc:
        raise ConfigError(f"{key}: {path}: {exc}") from None
    if not keys:
        raise ConfigError(f"{key}: {path}: no signature key in the set")
    return keys


def configured_keys(config: Config) -> StaticKeys | None:
    """The key set of `auth.jwks_file`, read now (at start, by --check and on every reload); None
    without one. A relative path is read from the config file's directory."""
    auth = config.access.auth
    if not auth.enforced or auth.jwks_file is None:
        return None
    path = os.path.join(os.path.dirname(config.source), os.path.expanduser(auth.jwks_file))
    try:
        return StaticKeys(read_jwks_file(path, auth.algorithms))
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


class StaticKeys:
    """A key set that never changes until a reload (`jwks_file`)."""

    def __init__(self, keys: KeySet) -> None:
        self.current: KeySet | None = keys

    def refresh_for_unknown(self) -> asyncio.Future[None] | None:
        return None

    async def run(self) -> None:
        return

    async def close(self) -> None:
        return


class JwksSource:
    """A key set fetched from `url` and kept fresh."""

    def __init__(
        self,
        url: str,
        algorithms: Collection[str],
        metrics: Metrics,
        *,
        refresh: float = 300.0,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._algorithms = tuple(algorithms)
        self._metrics = metrics
        self._refresh = refresh
        self._cooldown = cooldown
        self._clock = clock
        self.current: KeySet | None = None
        self._forced_at = float("-inf")
        self._fetching: asyncio.Future[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    def refresh_for_unknown(self) -> asyncio.Future[None] | None:
        """A fetch for a token whose kid is unknown (or while no set was ever fetched): the one in
        flight, a new one, or None while the cooldown since the last such fetch lasts."""
        if self._fetching is not None:
            return self._fetching
        now = self._clock()
        if now - self._forced_at < self._cooldown:
            return None
        self._forced_at = now
        return self.fetch()

    def fetch(self) -> asyncio.Future[None]:
        """Fetch now (sharing a fetch in flight); the future never fails."""
        if self._fetching is None:
            future = asyncio.ensure_future(self._fetch())
            self._fetching = future
            future.add_done_callback(self._fetched)
        return self._fetching

    def _fetched(self, future: asyncio.Future[None]) -> None:
        self._fetching = None

    async def _fetch(self) -> None:
        try:
            keys = KeySet(await self._download(), self._algorithms)
            if not keys:
                raise ValueError("no signature key in the set")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self._metrics.jwks["error"].value += 1
            kept = "keeping the last good set" if self.current is not None else "no key set yet"
            log.warning("auth: fetching %s failed: %s; %s", self.url, exc or type(exc).__name__, kept)
            return
        self._metrics.jwks["ok"].value += 1
        if self.current is None or keys.fingerprint != self.current.fingerprint:
            log.info("auth: key set from %s: %d keys", self.url, len(keys))
            self.current = keys

    async def _download(self) -> object:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        async with self._http.get(self.url, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            data = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(data) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return json.loads(data)

    async def run(self) -> None:
        """Fetch now, then every `refresh` seconds (every `cooldown` while no set was fetched)."""
        while not self._closed:
            await self.fetch()
            await asyncio.sleep(self._refresh if self.current is not None else self._cooldown)

    async def close(self) -> None:
        self._closed = True
        if self._fetching is not None:
            self._fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetching
        if self._http is not None:
            await self._http.close()
