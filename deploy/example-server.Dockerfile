# The demo's MCP server (examples/server.py, a small stateful FastMCP server) as an image, for the
# recipes in deploy/: build it from the repository root.
#
#   docker build -f deploy/example-server.Dockerfile -t mcp-example-server:0.1.0 .
FROM python:3.11.13-slim-bookworm

RUN pip install --no-cache-dir fastmcp==4.1.2 mcp==2.3.0 \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mcp
COPY --chmod=0644 examples/server.py /app/server.py

USER mcp
EXPOSE 8000
ENTRYPOINT ["python", "/app/server.py"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
