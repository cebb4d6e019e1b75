"""Static checks of docker-compose.yml, Dockerfile and .dockerignore (no Docker engine needed).

The files are parsed, and the router's environment is validated with the same Settings
class the service uses, so a typo in a variable name, a URL pointing at the wrong service
or credentials out of step with the postgres container fail here instead of at `docker
compose up`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from decision_router.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = ("redis", "postgres", "router")
BACKING_SERVICES = ("redis", "postgres")
# Ports the images listen on when the compose file declares none.
IMAGE_DEFAULT_PORTS = {"redis": 6379, "postgres": 5432}
# Without these the router silently falls back to embedded fakeredis / a local sqlite file.
REQUIRED_ENV = ("REDIS_URL", "DATABASE_URL", "RULES_DIR", "LOG_FORMAT")


# --------------------------------------------------------------------------- compose helpers


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    services = compose.get("services")
    assert isinstance(services, dict), "docker-compose.yml has no services mapping"
    return services


def service_env(service: dict) -> dict[str, str | None]:
    """Compose allows environment as a mapping or as a list of KEY=VALUE strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs: dict[str, str | None] = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            pairs[key] = value if sep else None
        return pairs
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def container_ports(name: str, service: dict) -> set[int]:
    """Ports the service listens on inside the compose network."""
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            target = str(entry).rsplit(":", 1)[-1].split("/", 1)[0]
            ports.add(int(target))
    for entry in service.get("expose") or []:
        ports.add(int(str(entry).split("/", 1)[0]))
    return ports or {IMAGE_DEFAULT_PORTS[name]}


def healthcheck_words(service: dict) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, str):  # the string form is run by the container's shell
        return ["CMD-SHELL", *shlex.split(test)]
    return [str(word) for word in test or []]


@pytest.fixture(scope="module")
def router_env(services: dict) -> dict[str, str | None]:
    return service_env(services["router"])


@pytest.fixture()
def router_settings(router_env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The router's compose environment, validated by the service's own Settings."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    kwargs = {
        key.removeprefix(ENV_PREFIX).lower(): value
        for key, value in router_env.items()
        if key.startswith(ENV_PREFIX) and value is not None
    }
    return Settings(**kwargs)


@pytest.fixture(scope="module")
def postgres_env(services: dict) -> dict[str, str | None]:
    return service_env(services["postgres"])


# --------------------------------------------------------------------------- Dockerfile helpers


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by build stage; comments dropped, continuations joined."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    if buffer:
        logical.append(buffer)

    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"Dockerfile instruction before FROM: {line}"
            stages[-1].instructions.append((instruction, args))
    return stages


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None


def copies(stage: Stage) -> list[Copy]:
    """COPY/ADD instructions with the destination resolved against WORKDIR."""
    result = []
    workdir = PurePosixPath("/")
    for instruction, args in stage.instructions:
        if instruction == "WORKDIR":
            workdir = workdir / args
        if instruction not in ("COPY", "ADD"):
            continue
        words = exec_form(args) or shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        *sources, dest = paths
        result.append(Copy([s.rstrip("/").removeprefix("./") for s in sources], str(workdir / dest), from_stage))
    return result


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert stages, "Dockerfile has no FROM"
    return stages


@pytest.fixture(scope="module")
def final_stage(stages: list[Stage]) -> Stage:
    return stages[-1]


def last(stage: Stage, instruction: str) -> str | None:
    values = [args for instr, args in stage.instructions if instr == instruction]
    return values[-1] if values else None


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage.instructions:
        if instruction != "ENV":
            continue
        words = shlex.split(args)
        if words and "=" not in words[0]:  # legacy "ENV KEY value"
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def rules_destination(stage: Stage) -> str | None:
    for copy in copies(stage):
        if copy.from_stage is None and "rules" in copy.sources:
            # Docker copies a directory's *contents* into dest, so dest is the rules dir.
            return copy.dest.rstrip("/")
    return None


def dockerignored(path: str) -> bool:
    """Approximation of .dockerignore matching (later patterns win, ! re-includes)."""
    if not DOCKERIGNORE.exists():
        return False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().removeprefix("./").strip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------- compose: services


@pytest.mark.parametrize("name", SERVICES)
def test_service_exists(services: dict, name: str) -> None:
    assert isinstance(services.get(name), dict), f"service {name!r} missing from docker-compose.yml"


@pytest.mark.parametrize(
    ("name", "image"),
    [("redis", "redis:7-alpine"), ("postgres", "postgres:16-alpine")],
    ids=["redis", "postgres"],
)
def test_backing_service_image(services: dict, name: str, image: str) -> None:
    assert services[name].get("image") == image


@pytest.mark.parametrize(
    ("name", "expected_words"),
    [
        ("redis", ["redis-cli", "ping"]),
        ("postgres", ["pg_isready"]),
        ("router", ["decision-router", "health"]),
    ],
    ids=SERVICES,
)
def test_service_has_healthcheck(services: dict, name: str, expected_words: list[str]) -> None:
    healthcheck = services[name].get("healthcheck")
    assert isinstance(healthcheck, dict), f"{name} has no healthcheck"
    assert not healthcheck.get("disable"), f"{name} healthcheck is disabled"
    words = healthcheck_words(services[name])
    assert words and words[0] in ("CMD", "CMD-SHELL"), f"{name} healthcheck test must start with CMD or CMD-SHELL"
    command = " ".join(words[1:])
    for word in expected_words:
        assert word in command.split(), f"{name} healthcheck {command!r} does not run {' '.join(expected_words)}"


def test_pg_isready_uses_postgres_user(services: dict, postgres_env: dict[str, str | None]) -> None:
    words = " ".join(healthcheck_words(services["postgres"])[1:]).split()
    # Without -U, pg_isready probes as the container's OS user and logs "role ... does not exist".
    assert "-U" in words, "pg_isready should name the user with -U"
    assert words[words.index("-U") + 1] == postgres_env.get("POSTGRES_USER")


@pytest.mark.parametrize("key", ["POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"])
def test_postgres_credentials_set(postgres_env: dict[str, str | None], key: str) -> None:
    assert postgres_env.get(key) == "decision_router"


@pytest.mark.parametrize("dependency", BACKING_SERVICES)
def test_router_waits_for_healthy(services: dict, dependency: str) -> None:
    depends_on = services["router"].get("depends_on")
    assert isinstance(depends_on, dict), "router depends_on must be a mapping with conditions, not a list"
    assert dependency in depends_on, f"router does not depend on {dependency}"
    assert (depends_on[dependency] or {}).get("condition") == "service_healthy"


def test_router_builds_from_repo_root(services: dict) -> None:
    build = services["router"].get("build")
    context = build.get("context") if isinstance(build, dict) else build
    assert context in (".", "./"), f"router build context is {context!r}, expected the repo root"


def test_router_command_is_serve(services: dict) -> None:
    command = services["router"].get("command")
    words = shlex.split(command) if isinstance(command, str) else list(command or [])
    assert words == ["serve"]


# --------------------------------------------------------------------------- compose: router environment


def test_router_env_names_are_settings_fields(router_env: dict[str, str | None]) -> None:
    ours = [key for key in router_env if key.startswith(ENV_PREFIX)]
    assert ours, "router environment sets no DECISION_ROUTER_* variables"
    # Settings ignores unknown variables, so a misspelt name would be silently dropped.
    unknown = [key for key in ours if key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields]
    assert not unknown, f"not fields of Settings: {unknown}"


@pytest.mark.parametrize("name", REQUIRED_ENV)
def test_router_required_env_set(router_env: dict[str, str | None], name: str) -> None:
    value = router_env.get(ENV_PREFIX + name)
    assert value, f"{ENV_PREFIX}{name} is not set for router"


def test_router_env_validates(router_settings: Settings) -> None:
    assert not router_settings.embedded, "router would run embedded fakeredis instead of the redis service"
    assert router_settings.database_url.startswith("postgresql+psycopg://")
    assert router_settings.log_format == "json"


def test_redis_url_targets_redis_service(router_settings: Settings, services: dict) -> None:
    url = urlsplit(router_settings.redis_url or "")
    assert url.scheme == "redis"
    assert url.hostname == "redis", f"redis URL host {url.hostname!r} is not the redis service"
    port = url.port or 6379
    assert port in container_ports("redis", services["redis"]), f"redis URL port {port} is not a redis container port"


@pytest.mark.parametrize(
    ("attribute", "expected_from"),
    [
        ("host", "service"),
        ("port", "container_port"),
        ("username", "POSTGRES_USER"),
        ("password", "POSTGRES_PASSWORD"),
        ("database", "POSTGRES_DB"),
    ],
    ids=["host", "port", "user", "password", "db"],
)
def test_database_url_matches_postgres(
    router_settings: Settings,
    services: dict,
    postgres_env: dict[str, str | None],
    attribute: str,
    expected_from: str,
) -> None:
    url = make_url(router_settings.database_url)
    assert url.drivername == "postgresql+psycopg"
    actual = getattr(url, attribute)
    if expected_from == "service":
        assert actual == "postgres", f"database URL host {actual!r} is not the postgres service"
    elif expected_from == "container_port":
        port = actual or 5432
        assert port in container_ports("postgres", services["postgres"])
    else:
        assert actual == postgres_env.get(expected_from), f"database URL {attribute} differs from {expected_from}"


def test_rules_dir_is_where_the_image_puts_rules(router_settings: Settings, final_stage: Stage) -> None:
    assert str(router_settings.rules_dir) == rules_destination(final_stage)


def test_rules_volume_mounts_repo_rules_at_rules_dir(services: dict, router_settings: Settings) -> None:
    mounts = []
    for volume in services["router"].get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume.get("source"), volume.get("target"), bool(volume.get("read_only"))))
        else:
            source, target, *mode = str(volume).split(":")
            mounts.append((source, target, "ro" in ",".join(mode).split(",")))
    rules_mounts = [m for m in mounts if m[0] in ("./rules", "rules", "./rules/")]
    if not rules_mounts:
        pytest.skip("router does not mount ./rules (the image copy is used)")
    for _, target, read_only in rules_mounts:
        assert target.rstrip("/") == str(router_settings.rules_dir)
        assert read_only, "the rules mount should be read-only"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image(final_stage: Stage) -> None:
    assert final_stage.base == "python:3.11-slim"


def test_dockerfile_entrypoint(final_stage: Stage) -> None:
    entrypoint = last(final_stage, "ENTRYPOINT")
    assert entrypoint is not None, "Dockerfile has no ENTRYPOINT"
    # Exec form, so signals reach the process and `docker run IMAGE health` works.
    assert exec_form(entrypoint) == ["decision-router"]


def test_dockerfile_cmd_is_serve(final_stage: Stage) -> None:
    cmd = last(final_stage, "CMD")
    assert cmd is not None and exec_form(cmd) == ["serve"]


def test_dockerfile_runs_as_non_root(final_stage: Stage) -> None:
    user = last(final_stage, "USER")
    assert user is not None, "Dockerfile has no USER: the container would run as root"
    assert user.split(":")[0] not in ("root", "0")


def test_dockerfile_installs_package(stages: list[Stage]) -> None:
    runs = [args for stage in stages for instr, args in stage.instructions if instr == "RUN"]
    assert any("pip install" in run for run in runs), "Dockerfile never pip-installs the package"


def test_dockerfile_copies_rules(final_stage: Stage) -> None:
    assert rules_destination(final_stage), "Dockerfile does not COPY rules/ into the image"


def test_dockerfile_api_listens_beyond_the_container(final_stage: Stage) -> None:
    """Without compose (docker run -p 8080:8080 IMAGE) the API listened on the container's loopback only."""
    assert dockerfile_env(final_stage).get(ENV_PREFIX + "API_HOST") == "0.0.0.0"
    exposed = [args for instr, args in final_stage.instructions if instr == "EXPOSE"]
    assert str(Settings.model_fields["api_port"].default) in " ".join(exposed).split()


def test_dockerfile_rules_dir_env_matches_copy(final_stage: Stage) -> None:
    env = dockerfile_env(final_stage)
    assert env.get(ENV_PREFIX + "RULES_DIR") == rules_destination(final_stage)


def _build_inputs() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    inputs = ["pyproject.toml", "decision_router", "rules"]
    readme = pyproject.get("project", {}).get("readme")
    if isinstance(readme, str):  # setuptools refuses to build when the declared readme is missing
        inputs.append(readme)
    return inputs


@pytest.mark.parametrize("path", _build_inputs())
def test_build_input_copied_and_not_dockerignored(stages: list[Stage], path: str) -> None:
    copied = {source for stage in stages for copy in copies(stage) if copy.from_stage is None for source in copy.sources}
    assert path in copied or "." in copied, f"Dockerfile never copies {path}"
    assert not dockerignored(path), f".dockerignore excludes {path}, which the build needs"


@pytest.mark.parametrize("path", [".venv", ".git", "decision_router/__pycache__", "decision_router.db",
                                  "decision_router.db-wal", "decision_router.db-shm", "decision_router_demo_rules"])
def test_dockerignore_keeps_context_small(path: str) -> None:
    assert dockerignored(path), f".dockerignore should exclude {path}"
