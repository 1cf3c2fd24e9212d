"""The `listen` key: one "host:port", or a list of listeners, each plain or TLS.

`listen: "0.0.0.0:8080"` is today's one plain listener, unchanged. A list holds entries that are a
"host:port" string (plain) or a mapping `{address, tls?}`; `tls` terminates TLS on that address
with a certificate and key, optionally verifying client certificates (`client_ca`). Both forms are
turned into a tuple of ListenEntry before validation, so an error names `listen[i].key`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Self

from pydantic import BeforeValidator, Field, GetJsonSchemaHandler, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import CoreSchema

from mcpbalancer.config import checks
from mcpbalancer.config.checks import describe
from mcpbalancer.config.models import MODEL, Flag, HostPort, Section, Text, invalid, one_of

TLS_VERSIONS: Final = ("1.2", "1.3")
DEFAULT_LISTEN: Final = "127.0.0.1:8080"
# `bind_sessions: client_cert`: sessions bound to the verified client certificate's subject.
CLIENT_CERT: Final = "client_cert"


def _version_text(raw: object) -> object:
    """`min_version: 1.3` (a YAML number) is "1.3"."""
    return str(raw) if isinstance(raw, float) and not isinstance(raw, bool) else raw


TlsVersion = Annotated[str, BeforeValidator(_version_text, json_schema_input_type=str), one_of(TLS_VERSIONS)]


@dataclass(frozen=True, slots=True, config=MODEL)
class ListenTlsSection(Section):
    """TLS terminated on this listener: the certificate clients see, and optionally mutual TLS."""

    cert: Text = Field(
        description="PEM file of the server certificate (its chain after it); a relative path is read "
        "from the config file's directory. Re-read on every reload."
    )
    key: Text | None = Field(
        default=None, description="PEM file of the certificate's private key, when not in `cert`."
    )
    client_ca: Text | None = Field(
        default=None,
        description="PEM file of the CAs whose client certificates are verified (mutual TLS); a client "
        "may still connect without one unless require_client_cert is set.",
    )
    require_client_cert: Flag = Field(
        default=False,
        description="Refuse the handshake of a client without a certificate of `client_ca`.",
    )
    min_version: TlsVersion = Field(default="1.2", description="The oldest TLS version accepted: 1.2 or 1.3.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.require_client_cert and self.client_ca is None:
            raise invalid(
                ("require_client_cert",), "needs `client_ca`: the CAs client certificates are checked against"
            )
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class ListenEntry(Section):
    """One listener: an address, plain HTTP or (with `tls`) HTTPS."""

    address: HostPort = Field(description="host:port to accept clients on (IPv6 as [::1]:8443).")
    tls: ListenTlsSection | None = Field(default=None, description=ListenTlsSection.__doc__)


def _entries(raw: object) -> object:
    """A string is one plain listener; a list's strings are plain listeners too."""
    if isinstance(raw, str):
        return ({"address": raw},)
    if isinstance(raw, list | tuple):
        if not raw:
            raise ValueError("must name at least one address")
        return tuple({"address": item} if isinstance(item, str) else item for item in raw)
    raise ValueError(f"must be 'host:port' or a list of listeners, got {describe(raw)}")


class _ListenSchema:
    """The JSON Schema of `listen`: the string of one address, or the list."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        listed = handler(schema)
        items = listed.get("items", {})
        listed = {**listed, "items": {"anyOf": [{"type": "string"}, items]}, "minItems": 1}
        return {"anyOf": [{"type": "string"}, listed]}


Listeners = Annotated[
    tuple[ListenEntry, ...],
    BeforeValidator(_entries),
    _ListenSchema(),
]


def duplicate(entries: tuple[ListenEntry, ...]) -> tuple[int, str] | None:
    """The index of an entry whose address an earlier one has, and the problem; None if none."""
    seen: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(entries):
        address = checks.split_host_port(entry.address)
        if address[1] != 0 and address in seen:  # port 0: each picks a free port of its own
            return i, f"{entry.address} is listed twice (also listen[{seen[address]}])"
        seen[address] = i
    return None


def tls_listeners(entries: tuple[ListenEntry, ...]) -> list[ListenTlsSection]:
    return [entry.tls for entry in entries if entry.tls is not None]
