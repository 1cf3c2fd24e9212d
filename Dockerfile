# An exact release, not a floating tag: a rebuild gets the same Python and Debian.
FROM python:3.11.13-slim-bookworm

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mcpbalancer
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mcpbalancer ./mcpbalancer
RUN pip install --no-cache-dir . && rm -rf /src
# The default configuration (config/docker.yaml): MCP on 8080, the admin listener on 9100. Mount
# your own over it, readable by uid 10001 (docs/operations.md, "Docker").
COPY --chmod=0644 config/docker.yaml /etc/mcpbalancer/config.yaml

USER mcpbalancer
WORKDIR /
EXPOSE 8080 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["mcpbalancer", "--config", "/etc/mcpbalancer/config.yaml", "--healthcheck"]
ENTRYPOINT ["mcpbalancer"]
CMD ["--config", "/etc/mcpbalancer/config.yaml"]
