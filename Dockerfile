FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mcpbalancer
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mcpbalancer ./mcpbalancer
RUN pip install --no-cache-dir . && rm -rf /src

USER mcpbalancer
EXPOSE 8080
ENTRYPOINT ["mcpbalancer"]
CMD ["--config", "/etc/mcpbalancer/config.yaml"]
