"""The deployment files: docker-compose.yml's structure and the Dockerfile's defaults.

No Docker engine runs the files here. The structure is checked with PyYAML everywhere; where a
Compose implementation is installed (`docker compose` or `docker-compose`), it parses and
resolves the file too.
"""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("api", "worker", "api-gpu", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def test_every_part_of_the_service_is_there(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "postgres", "migrate", *APP_SERVICES}


def test_redis_persists_append_only_to_a_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _named_volume_at(redis, "/data") in compose["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_postgres_keeps_its_data_in_a_volume_and_reports_health(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    postgres = services["postgres"]
    assert _named_volume_at(postgres, "/var/lib/postgresql/data") in compose["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("metarec", "metarec")


def test_migrate_runs_once_after_postgres_is_healthy(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["metarec", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_api_and_worker_start_after_a_successful_migration(
    services: dict[str, Any], name: str
) -> None:
    depends_on = services[name]["depends_on"]
    assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
    assert depends_on["redis"] == {"condition": "service_healthy"}
    assert depends_on["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_api_and_worker_reach_redis_postgres_and_the_shared_model_store(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    env = service["environment"]
    assert env["METAREC_REDIS_URL"].startswith("redis://redis:6379")
    assert "@postgres:5432/metarec" in env["METAREC_DATABASE_URL"]
    assert _named_volume_at(service, env["METAREC_MODEL_STORE_PATH"]) == "models"
    role = name.removesuffix("-gpu")
    assert service["command"] == ["metarec", role]


def test_only_the_api_publishes_a_port_and_has_a_health_check(services: dict[str, Any]) -> None:
    for name in ("api", "api-gpu"):
        assert services[name]["ports"] == ["${METAREC_PORT:-8000}:8000"]
        assert "/healthz" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        assert "ports" not in services[name]
        assert "healthcheck" not in services[name]


def test_the_gpu_profile_gives_api_and_worker_the_gpu(services: dict[str, Any]) -> None:
    for name in ("api-gpu", "worker-gpu"):
        service = services[name]
        assert service["profiles"] == ["gpu"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert service["environment"]["METAREC_DEVICE"] == "cuda"
        assert "whl/cu" in service["build"]["args"]["TORCH_INDEX_URL"]
    for name in ("api", "worker", "migrate"):
        assert "profiles" not in services[name] and "deploy" not in services[name]


def test_the_dockerfile_builds_cpu_torch_by_default_with_a_cuda_switch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and line[0] != "#"]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in dockerfile
    assert instructions[-1] == 'CMD ["metarec", "api"]'
    # the files the image needs are not excluded from the build context
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("app", "models", "migrations", "alembic.ini", "pyproject.toml", "README.md"):
        assert needed not in ignored


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_a_compose_implementation_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no `docker compose` or `docker-compose` installed: structure checked only")

    for profile_args in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [*command, "-f", str(ROOT / "docker-compose.yml"), *profile_args, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def _named_volume_at(service: dict[str, Any], target: str) -> str | None:
    for volume in service.get("volumes", []):
        source, _, mounted = volume.partition(":")
        if mounted.split(":")[0] == target:
            return source
    return None
