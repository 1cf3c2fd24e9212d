"""The recipes of deploy/ agree with the configurations they mount, without a cluster or a daemon.

Every manifest is parsed; each proxy's configuration is `--check`ed as the recipe runs it (the
environment its manifest defines, with placeholder secrets); and what the manifests say about the
proxy is compared with what its configuration says: the ports it listens on, the probe paths, the
variables it names, the service its `discover` entry looks up, the grace periods against
`shutdown_timeout` and the drain. `kubectl kustomize` and `systemd-analyze verify` run too where
those programs exist (they need no cluster and no running systemd).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer import cli
from mcpbalancer.config import DEFAULT_SHUTDOWN_TIMEOUT, Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PLACEHOLDER = "placeholder-secret-0123456789abcdef"  # long enough for session_binding_key


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def check(config: Path, environ: dict[str, str]) -> str:
    """`mcpbalancer --config FILE --check` in a process with exactly `environ`; its output."""
    env = {"PATH": os.environ.get("PATH", ""), **environ}
    done = subprocess.run(
        [sys.executable, "-m", "mcpbalancer", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def referenced(config: Path) -> set[str]:
    """The variables the file's string values name (as the loader reads them, comments aside)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.update(REFERENCE.findall(node))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(config.read_text(encoding="utf-8")))
    return found


def port_of(address: tuple[str, int] | None) -> int:
    assert address is not None
    return address[1]


def sleep_seconds(container: dict[str, Any]) -> int:
    [word, seconds] = container["lifecycle"]["preStop"]["exec"]["command"]
    assert word == "sleep"
    return int(seconds)


# --- Kubernetes ------------------------------------------------------------------------------------


class Cluster:
    """The kustomize base, read as kustomize reads it (it uses no patches)."""

    def __init__(self) -> None:
        self.kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
        self.objects = [doc for name in self.kustomization["resources"] for doc in documents(K8S / name)]
        [generator] = self.kustomization["configMapGenerator"]
        self.config_map = generator["name"]
        [source] = generator["files"]
        self.config_key, _, file = source.partition("=")
        self.config_file = K8S / file
        self.namespace = self.kustomization["namespace"]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        [found] = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        return found

    def container(self, deployment: str) -> dict[str, Any]:
        [container] = self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        return container

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment, each secret replaced by a placeholder."""
        env = {}
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in self.secret_keys(ref["name"]), ref
                env[var["name"]] = PLACEHOLDER
            else:
                env[var["name"]] = var.get("value", "value")
        return env

    @staticmethod
    def secret_keys(name: str) -> set[str]:
        [secret] = documents(K8S / "secret.example.yaml")
        assert secret["metadata"]["name"] == name
        return set(secret["stringData"])


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture(scope="module")
def proxy_config(cluster: Cluster) -> Config:
    return load_config(cluster.config_file, environ=cluster.env(cluster.container("mcpbalancer")))


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_every_manifest_parses_and_the_base_names_files_that_exist(cluster: Cluster) -> None:
    for path in sorted(K8S.glob("*.yaml")):
        assert documents(path), path
    assert {o["kind"] for o in cluster.objects} >= {"Deployment", "Service", "PodDisruptionBudget"}
    assert cluster.config_file.exists()
    assert all(o["metadata"].get("namespace") in (None, cluster.namespace) for o in cluster.objects)


def test_the_proxy_config_passes_its_own_check_with_the_env_the_deployment_defines(
    cluster: Cluster,
) -> None:
    container = cluster.container("mcpbalancer")
    env = cluster.env(container)
    assert referenced(cluster.config_file) <= set(env)  # every ${NAME} is defined
    assert check(cluster.config_file, env).startswith(f"{cluster.config_file}: OK")
    # The arguments are the CLI's, and name the file where the ConfigMap is mounted.
    args = cli.parse_args(container["args"])
    [mount] = container["volumeMounts"]
    assert args.config == f"{mount['mountPath']}/{cluster.config_key}"
    [volume] = cluster.get("Deployment", "mcpbalancer")["spec"]["template"]["spec"]["volumes"]
    assert (volume["name"], volume["configMap"]["name"]) == (mount["name"], cluster.config_map)


def test_the_proxy_deployment_agrees_with_its_config(cluster: Cluster, proxy_config: Config) -> None:
    deployment = cluster.get("Deployment", "mcpbalancer")
    pod = deployment["spec"]["template"]["spec"]
    container = cluster.container("mcpbalancer")
    named = ports(container)
    assert deployment["spec"]["replicas"] == 2
    assert named["mcp"] == proxy_config.listen_port
    assert named["admin"] == port_of(proxy_config.admin)
    # With an admin listener the probes are answered there (and forwarded on the public one).
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["terminationGracePeriodSeconds"] > sleep_seconds(container) + proxy_config.shutdown_timeout
    labels = pod_labels(deployment)
    budget = cluster.get("PodDisruptionBudget", "mcpbalancer")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] < deployment["spec"]["replicas"]
    service = cluster.get("Service", "mcpbalancer")["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= set(named)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_the_proxy_discovers_the_headless_service_of_the_backends(
    cluster: Cluster, proxy_config: Config
) -> None:
    [entry] = proxy_config.discovery
    service = cluster.get("Service", "tools")
    assert entry.dns == f"{service['metadata']['name']}.{cluster.namespace}.svc.cluster.local"
    assert service["spec"]["clusterIP"] == "None"  # headless: the name answers every pod's address
    assert service["spec"]["publishNotReadyAddresses"] is False  # a terminating pod leaves the answer
    container = cluster.container("tools")
    [port] = service["spec"]["ports"]
    assert ports(container)[port["targetPort"]] == entry.port
    assert service["spec"]["selector"].items() <= pod_labels(cluster.get("Deployment", "tools")).items()
    # The server listens where the Service points, on every address of the pod.
    args = container["args"]
    assert args[args.index("--port") + 1] == str(entry.port)
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_the_backends_rollout_settings_cover_discovery_and_the_drain(
    cluster: Cluster, proxy_config: Config
) -> None:
    """docs/deploy.md's rule: preStop >= interval + DNS TTL + drain_timeout, the grace period above
    it, one pod at a time and never fewer than wanted."""
    [entry] = proxy_config.discovery
    deployment = cluster.get("Deployment", "tools")
    container = cluster.container("tools")
    dns_ttl = 5  # CoreDNS's kubernetes plugin
    pre_stop = sleep_seconds(container)
    assert entry.template.drain_timeout > 0
    assert pre_stop >= entry.interval + dns_ttl + entry.template.drain_timeout
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert proxy_config.failover == "replay"  # the sessions left at drain_timeout move


def test_redis_is_where_the_store_url_says_with_the_password_of_the_secret(
    cluster: Cluster, proxy_config: Config
) -> None:
    assert proxy_config.store == f"redis://:{PLACEHOLDER}@redis:6379/0"
    service = cluster.get("Service", "redis")["spec"]
    [port] = service["ports"]
    assert port["port"] == 6379
    container = cluster.container("redis")
    assert ports(container)[port["targetPort"]] == 6379
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    proxy_ref = {v["name"]: v["valueFrom"] for v in cluster.container("mcpbalancer")["env"]}["REDIS_PASSWORD"]
    assert {v["name"]: v["valueFrom"] for v in container["env"]}["REDIS_PASSWORD"] == proxy_ref


def test_the_service_monitor_scrapes_the_admin_port_of_the_proxy_service(cluster: Cluster) -> None:
    [monitor] = documents(K8S / "servicemonitor.yaml")
    service = cluster.get("Service", "mcpbalancer")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_base() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    [config_map] = [o for o in objects if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["name"].startswith("mcpbalancer-config-")  # the generated name...
    [proxy] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mcpbalancer"]
    [volume] = proxy["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # ...is the one mounted
    assert {o["metadata"]["namespace"] for o in objects} == {"mcp"}


# --- Docker Compose --------------------------------------------------------------------------------


def compose_interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:?message} and ${NAME:-default}, from `environ`."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match["name"], match["op"], match["rest"]
        if name in environ:
            return environ[name]
        assert op != ":?", f"compose refuses to start without {name}: {rest}"
        return rest if op == ":-" else ""

    return re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:[?-])(?P<rest>[^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of each bind mount (relative to deploy/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_services_build_and_mount_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"proxy-1", "proxy-2", "redis", "tools", "prometheus", "grafana"} <= set(services)
    assert services["tools"]["deploy"]["replicas"] == 3
    for name, service in services.items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).exists(), name
        for host in mounts(service).values():
            assert host.exists(), (name, host)


def test_each_compose_proxy_checks_its_config_with_the_env_compose_gives(compose: dict[str, Any]) -> None:
    secrets = {"MCPB_BINDING_KEY": PLACEHOLDER, "REDIS_PASSWORD": PLACEHOLDER}  # the operator's shell
    for name in ("proxy-1", "proxy-2"):
        service = compose["services"][name]
        config = mounts(service)["/etc/mcpbalancer/config.yaml"]  # the image's default --config
        env = {key: compose_interpolate(str(value), secrets) for key, value in service["environment"].items()}
        assert referenced(config) <= set(env), name
        assert check(config, env).startswith(f"{config}: OK")
        loaded = load_config(config, environ=env)
        [published] = service["ports"]
        assert int(published.rsplit(":", 1)[1]) == loaded.listen_port
        assert service["stop_grace_period"] == "15s"
        assert loaded.shutdown_timeout < 15
        # The discovered service is a Compose service serving on the port the entry names.
        [entry] = loaded.discovery
        tools = compose["services"][entry.dns]
        assert tools["command"][tools["command"].index("--port") + 1] == str(entry.port)
        assert loaded.store == f"redis://:{PLACEHOLDER}@redis:6379/0"
        redis_command = [
            compose_interpolate(word, secrets) for word in compose["services"]["redis"]["command"]
        ]
        assert redis_command[redis_command.index("--requirepass") + 1] == PLACEHOLDER


def test_prometheus_scrapes_both_proxies_admin_listeners_and_grafana_reads_it(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    prometheus_dir = mounts(services["prometheus"])["/etc/prometheus"]
    command = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    scrape = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text(encoding="utf-8"))
    [job] = scrape["scrape_configs"]
    [targets] = job["static_configs"]
    admin = {}
    for name in ("proxy-1", "proxy-2"):
        config = mounts(services[name])["/etc/mcpbalancer/config.yaml"]
        env = dict.fromkeys(referenced(config), PLACEHOLDER)
        admin[name] = port_of(load_config(config, environ=env).admin)
    assert sorted(targets["targets"]) == sorted(f"{name}:{port}" for name, port in admin.items())
    assert job["metrics_path"] == "/metrics"
    # The shipped alert rules beside the scrape configuration (not their promtool tests).
    assert scrape["rule_files"] == ["alerts.yaml"]
    for name in scrape["rule_files"]:
        assert yaml.safe_load((prometheus_dir / name).read_text(encoding="utf-8"))["groups"]
    grafana = mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "mcpbalancer.yaml").read_text())["providers"]
    dashboards = provider["options"]["path"]
    [dashboard] = [host for target, host in grafana.items() if target.startswith(dashboards + "/")]
    assert json.loads(dashboard.read_text(encoding="utf-8"))["uid"] == "mcpbalancer"


def test_the_example_server_image_copies_a_file_that_exists() -> None:
    text = (DEPLOY / "example-server.Dockerfile").read_text(encoding="utf-8")
    [source] = re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.MULTILINE)
    assert (ROOT / source).exists()
    assert "--host 0.0.0.0" in text.replace('", "', " ") or '"0.0.0.0"' in text


# --- systemd ---------------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "mcpbalancer.service", encoding="utf-8")
    return parser


def test_the_systemd_unit_reloads_by_sighup_restarts_on_failure_and_is_hardened() -> None:
    service = unit()["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error (cli.py exits 2)
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "DynamicUser"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert float(service["TimeoutStopSec"]) > DEFAULT_SHUTDOWN_TIMEOUT
    for key in ("ExecStartPre", "ExecStart"):
        program, *args = shlex.split(service[key])
        assert program.endswith("/mcpbalancer")
        cli.parse_args(args)
    assert "--check" in service["ExecStartPre"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # The unit names /usr/local/bin/mcpbalancer; verify it against this checkout's command.
    command = shutil.which("mcpbalancer", path=str(Path(sys.executable).parent))
    assert command is not None
    text = (DEPLOY / "systemd" / "mcpbalancer.service").read_text(encoding="utf-8")
    local = tmp_path / "mcpbalancer.service"
    local.write_text(text.replace("/usr/local/bin/mcpbalancer", command), encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mcpbalancer.service" not in done.stderr, done.stderr
