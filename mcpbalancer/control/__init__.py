"""The control plane: the admin listener and the health probes (aiohttp)."""
