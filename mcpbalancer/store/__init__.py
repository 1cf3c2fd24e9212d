"""Session stores: the session id -> backend name map."""

from mcpbalancer.store.base import UNKNOWN, SessionStore, Unknown

__all__ = ["UNKNOWN", "SessionStore", "Unknown"]
