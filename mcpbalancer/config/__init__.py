"""The configuration: a YAML file → validated, frozen objects the proxy reads.

- checks.py: checks of single values (URLs, host:port, command lines), pure functions;
- models.py: the scalar types, the sections the proxy reads as they are (timeouts, limits, ...);
- health.py: the health section, a backend's own health keys, and the merge of the two;
- access.py: auth, tool_policy and rate_limits, the one record (AccessConfig) the access filters read;
- file.py: the file's top level, backend entries and routes, with the checks across keys;
- runtime.py: Config, BackendConfig, RouteConfig, what the rest of the proxy reads;
- build.py: a validated file → Config; the worker checks after command-line overrides;
- loading.py: YAML, ${NAME} references, and pydantic's errors as `FILE: key.path: problem`;
- schema.py: the JSON Schema of the file (`mcpbalancer schema`, config/schema.json).

Every error is a ConfigError reading `FILE: key.path: what is wrong`.
"""

from mcpbalancer.config.access import (
    AccessConfig,
    ApiKey,
    AuthConfig,
    RateLimit,
    RateMatch,
    ToolRule,
    When,
    parse_rate,
)
from mcpbalancer.config.build import check_workers, parse_listen
from mcpbalancer.config.checks import PLACEHOLDERS, PROBE_PATHS
from mcpbalancer.config.file import MANAGED_HOST, ConfigFile
from mcpbalancer.config.health import PROBE_METHODS, PROBES, BackendHealth, HealthConfig, merged
from mcpbalancer.config.loading import load_config, parse_config
from mcpbalancer.config.models import (
    BALANCE_STRATEGIES,
    DEFAULT_LOCAL_CACHE_SIZE,
    DEFAULT_MCP_PATH,
    DEFAULT_SERVICE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STORE_PREFIX,
    ERAS,
    FAILOVER_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_REPLICAS,
    MAX_WORKERS,
    SESSION_MODES,
    STORE_ERROR_MODES,
    AffinityConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    TimeoutsConfig,
    TracingConfig,
)
from mcpbalancer.config.runtime import (
    BackendConfig,
    Config,
    DiscoveryConfig,
    ListenerConfig,
    RouteConfig,
    ServerTlsConfig,
    TlsConfig,
    host_port,
)
from mcpbalancer.errors import ConfigError

__all__ = [
    "BALANCE_STRATEGIES",
    "DEFAULT_LOCAL_CACHE_SIZE",
    "DEFAULT_MCP_PATH",
    "DEFAULT_SERVICE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_STORE_PREFIX",
    "ERAS",
    "FAILOVER_MODES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MANAGED_HOST",
    "MAX_REPLICAS",
    "MAX_WORKERS",
    "PLACEHOLDERS",
    "PROBES",
    "PROBE_METHODS",
    "PROBE_PATHS",
    "SESSION_MODES",
    "STORE_ERROR_MODES",
    "AccessConfig",
    "AffinityConfig",
    "ApiKey",
    "AuthConfig",
    "BackendConfig",
    "BackendHealth",
    "Config",
    "ConfigError",
    "ConfigFile",
    "DiscoveryConfig",
    "HealthConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "MetricsConfig",
    "RateLimit",
    "RateMatch",
    "RouteConfig",
    "ServerTlsConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "ToolRule",
    "TracingConfig",
    "When",
    "admin_of_worker",
    "check_workers",
    "host_port",
    "load_config",
    "merged",
    "parse_config",
    "parse_listen",
    "parse_rate",
]
