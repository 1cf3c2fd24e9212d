"""The Docker image, without a Docker daemon.

The Dockerfile is read as the build would read it: its COPY instructions are carried out into a
temporary root (the same sources, destinations and modes, owned by root as in the image), and the
package is imported from there, not from this checkout. Then `--check` runs on the baked-in
configuration as the image's user, uid 10001, and a mounted file that this user cannot read gives a
message saying so. The HEALTHCHECK command is run against a live proxy.

Running as another user needs root. The child is forked and drops to uid 10001 itself (no exec):
the interpreter running the tests may live where that user cannot reach, as a container's never does.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import posixpath
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import mcpbalancer.cli
from mcpbalancer.config import host_port, load_config, parse_config
from mcpbalancer.control.healthcheck import healthz_address
from tests.fixtures.proxy import DictProxy

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 30.0
BAKED_SOURCE = "config/docker.yaml"


@dataclass
class Dockerfile:
    base: str = ""
    user: str = ""
    uids: dict[str, int] = field(default_factory=dict)  # users made by `useradd --uid N name`
    copies: list[tuple[list[str], list[str], str]] = field(default_factory=list)  # flags, sources, dest
    expose: list[int] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)


def instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments skipped."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not logical:
            continue
        logical += line.rstrip().removesuffix("\\")
        if line.rstrip().endswith("\\"):
            logical += " "
            continue
        if logical.strip():
            word, _, args = logical.strip().partition(" ")
            yield word.upper(), args.strip()
        logical = ""


def read_dockerfile() -> Dockerfile:
    image, workdir = Dockerfile(), "/"
    for word, args in instructions((ROOT / "Dockerfile").read_text(encoding="utf-8")):
        if word == "FROM":
            image.base = args
        elif word == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif word == "RUN" and (m := re.search(r"useradd .*--uid (\d+) .*?(\S+)(?: &&|$)", args)):
            image.uids[m[2]] = int(m[1])
        elif word == "COPY":
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            *sources, dest = [w for w in words if not w.startswith("--")]
            image.copies.append((flags, sources, posixpath.join(workdir, dest) + ("/" * dest.endswith("/"))))
        elif word == "USER":
            image.user = args
        elif word == "EXPOSE":
            image.expose = [int(port.split("/")[0]) for port in args.split()]
        elif word == "HEALTHCHECK":
            image.healthcheck = yaml.safe_load(args.split(" CMD ", 1)[1])
        elif word in ("CMD", "ENTRYPOINT"):
            setattr(image, word.lower(), yaml.safe_load(args))
    return image


def lay_out(image: Dockerfile, root: Path) -> None:
    """What the COPY instructions put in the image, under `root`."""
    for flags, sources, dest in image.copies:
        mode = next((int(f.split("=", 1)[1], 8) for f in flags if f.startswith("--chmod=")), None)
        for source in sources:
            origin = ROOT / source
            target = root / dest.lstrip("/")
            if dest.endswith("/") or len(sources) > 1:
                target = target / origin.name
            make_dirs(root, target.parent)
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, target)
            if mode is not None:
                target.chmod(mode)


def make_dirs(root: Path, path: Path) -> None:
    # Docker creates missing directories 0755, whatever the umask.
    for parent in [*reversed(path.relative_to(root).parents), path.relative_to(root)]:
        (root / parent).mkdir(exist_ok=True)
        (root / parent).chmod(0o755)


def baked_path(image: Dockerfile) -> str:
    [dest] = [dest for _, sources, dest in image.copies if BAKED_SOURCE in sources]
    return dest


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A root directory others can enter (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="mcpb-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture
def image(image_root: Path) -> Dockerfile:
    if os.geteuid() != 0:
        pytest.skip("running --check as the image's uid 10001 needs root (the suite runs as root in CI)")
    dockerfile = read_dockerfile()
    lay_out(dockerfile, image_root)
    return dockerfile


def _as_user(uid: int, argv: list[str], src: str, cwd: str, out: int) -> None:
    """In the forked child: become `uid`, import the package from the image's files, run the CLI."""
    stream = os.fdopen(out, "w", buffering=1, closefd=False)
    sys.stdout = sys.stderr = stream
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.chdir(cwd)
    sys.dont_write_bytecode = True
    for name in [name for name in sys.modules if name.split(".")[0] == "mcpbalancer"]:
        del sys.modules[name]
    sys.path.insert(0, src)
    import mcpbalancer.cli as cli  # from `src`, read as that user

    if not cli.__file__ or not cli.__file__.startswith(src):
        print(f"imported {cli.__file__}, not the image's copy", flush=True)
        sys.exit(99)
    code = cli.main(argv)
    stream.flush()
    sys.exit(code)


def run_as(uid: int, image_root: Path, argv: list[str]) -> tuple[int, str]:
    """The image's `mcpbalancer <argv>` as `uid`: its exit status and its output."""
    assert mcpbalancer.cli.main  # imported: the child needs no module its user could not read
    with tempfile.TemporaryFile() as out:
        child = multiprocessing.get_context("fork").Process(
            target=_as_user, args=(uid, argv, str(image_root / "src"), str(image_root), out.fileno())
        )
        child.start()
        child.join(DEADLINE)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail(f"mcpbalancer {' '.join(argv)} did not end within {DEADLINE}s")
        out.seek(0)
        assert child.exitcode is not None
        return child.exitcode, out.read().decode()


# --- the Dockerfile ------------------------------------------------------------------------------


def test_base_image_is_an_exact_release() -> None:
    base = read_dockerfile().base
    assert re.fullmatch(r"python:3\.(\d+)\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert int(base.split(".")[1]) >= 11  # requires-python


def test_image_runs_as_uid_10001_and_exposes_the_baked_ports(image: Dockerfile, image_root: Path) -> None:
    assert image.uids[image.user] == 10001
    config = load_config(image_root / baked_path(image).lstrip("/"))
    assert config.listen_host == "0.0.0.0"
    assert config.admin is not None
    assert sorted(image.expose) == sorted({config.listen_port, config.admin[1]})
    assert image.entrypoint == ["mcpbalancer"]
    assert image.cmd == ["--config", baked_path(image)]
    assert image.healthcheck == ["mcpbalancer", "--config", baked_path(image), "--healthcheck"]


def test_check_of_the_baked_config_as_the_image_user(image: Dockerfile, image_root: Path) -> None:
    baked = image_root / baked_path(image).lstrip("/")
    assert (baked.stat().st_uid, baked.stat().st_mode & 0o777) == (0, 0o644)
    code, output = run_as(image.uids[image.user], image_root, ["--config", str(baked), "--check"])
    assert (code, output) == (0, f"{baked}: OK (1 backend, 1 worker)\n")


def test_a_mounted_config_the_image_user_cannot_read_is_a_clear_error(
    image: Dockerfile, image_root: Path
) -> None:
    mounted = image_root / baked_path(image).lstrip("/")
    mounted.chmod(0o600)  # what docs/operations.md advises for a file holding the binding key, owner root
    code, output = run_as(image.uids[image.user], image_root, ["--config", str(mounted), "--check"])
    assert code == 2, output
    assert output.startswith(f"mcpbalancer: invalid configuration: {mounted}: not readable by uid 10001")
    assert "belongs to uid 0 (gid 0) with mode 0600" in output
    assert "`chown 10001 <file>`" in output
    assert "Traceback" not in output


def test_operations_page_documents_the_mount_with_owner_and_mode() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    docker = operations.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    assert "sudo chown 10001:10001 my-config.yaml && chmod 0600 my-config.yaml" in docker
    assert "-v $PWD/my-config.yaml:/etc/mcpbalancer/config.yaml:ro mcpbalancer" in docker
    assert read_dockerfile().base in docker


# --- the health check ----------------------------------------------------------------------------


async def healthcheck(config: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcpbalancer", "--config", str(config), "--healthcheck",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(DEADLINE):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


def config_file(path: Path, **keys: Any) -> Path:
    data = {"backends": [{"name": "a", "url": "http://127.0.0.1:9"}], **keys}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("keys", "address"),
    [
        ({"listen": "0.0.0.0:8080", "admin": "0.0.0.0:9100"}, ("127.0.0.1", 9100)),
        ({"listen": "[::]:8080"}, ("::1", 8080)),
        ({"listen": "10.0.0.5:8080", "admin": "127.0.0.1:9100"}, ("127.0.0.1", 9100)),
        ({"listen": "10.0.0.5:8080"}, ("10.0.0.5", 8080)),
    ],
)
def test_healthcheck_asks_the_admin_listener_else_the_public_one(
    keys: dict[str, str], address: tuple[str, int]
) -> None:
    config = parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:9"}], **keys})
    assert healthz_address(config) == address


async def test_healthcheck_command_is_0_for_a_live_proxy_and_1_with_the_reason(
    dict_proxy: DictProxy, tmp_path: Path
) -> None:
    proxy = await dict_proxy(
        {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "backends": [{"name": "a", "url": "http://127.0.0.1:9"}],
            "health": {"interval": 0},
        }
    )
    assert proxy.control is not None
    live = config_file(tmp_path / "live.yaml", listen="0.0.0.0:8080", admin=f"0.0.0.0:{proxy.control.port}")
    assert await healthcheck(live) == (0, "")
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        dead = host_port(*bound.getsockname())
        code, output = await healthcheck(config_file(tmp_path / "dead.yaml", admin=dead))
    assert code == 1
    assert output.startswith(f"mcpbalancer: health check failed: http://{dead}/healthz: ")
    assert "Traceback" not in output
