"""The hot path: asyncio.Protocol + httptools on uvloop (DESIGN.md §2-3)."""
