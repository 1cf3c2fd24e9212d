"""mcpbalancer: a session-aware reverse proxy and load balancer for MCP over Streamable HTTP."""

__version__ = "0.1.0"
