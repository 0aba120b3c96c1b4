"""Hot swap under load: a uvicorn server answers recommendations continuously while versions are
published one after another; no request may fail and the served version must advance."""

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from app.keys import RedisKeys
from app.services.model_store import publish_version
from app.storage.db import make_engine
from models.synthetic import toy_serving_model
from tests.integration.server_support import free_port, wait_until_up

pytestmark = pytest.mark.integration

N_VERSIONS = 24
DRIVERS = 3


@dataclass
class Server:
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]


@pytest.fixture
def server(
    redis_url: str, migrated_database_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "METAREC_REDIS_URL": redis_url,
        "METAREC_DATABASE_URL": migrated_database_url,
        "METAREC_REDIS_PREFIX": redis_prefix,
        "METAREC_DATA_DIR": str(tmp_path),
        "METAREC_MODEL_STORE_PATH": str(tmp_path / "models"),
        "METAREC_MODEL_POLL_S": "0.5",
        "METAREC_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[2])
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base_url, process, timeout_s=30.0)
        yield Server(base_url, env, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000):
            client.delete(key)
        client.close()


@dataclass
class DriverLog:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _drive(base_url: str, users: list[str], stop: threading.Event, log: DriverLog) -> None:
    with httpx.Client(base_url=base_url, timeout=10.0) as http:
        while not stop.is_set():
            user_id = users[log.requests % len(users)]
            log.requests += 1
            try:
                response = http.get(f"/v1/users/{user_id}/recommendations", params={"k": 10})
            except httpx.HTTPError as exc:
                log.failures.append(f"{user_id}: {exc!r}")
                continue
            if not _answer_ok(response):
                log.failures.append(f"{user_id}: {response.status_code} {response.text[:200]}")
            elif response.json()["model_version"] is not None:
                log.versions.append(response.json()["model_version"])


def _answer_ok(response: httpx.Response) -> bool:
    if response.status_code != 200:
        return False
    body = response.json()
    if body["model_version"] is None:  # before the first version: the popularity fallback
        return bool(body["strategy"] == "popular")
    return len(body["items"]) == 10


def test_twenty_versions_swap_in_without_a_failed_request(
    server: Server, migrated_database_url: str, redis_url: str
) -> None:
    keys = RedisKeys(server.env["METAREC_REDIS_PREFIX"])
    store_path = Path(server.env["METAREC_MODEL_STORE_PATH"])
    engine = make_engine(migrated_database_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    base = uuid.uuid4().int % 10_000_000 * 100 + 1_000_000
    events = [{"user_id": "newbie", "item_id": f"i{n}"} for n in (1, 2, 3)]
    assert httpx.post(f"{server.base_url}/v1/events", json={"events": events}).status_code == 202

    def publish(offset: int) -> int:
        model = toy_serving_model(n_users=200, n_items=5_000, embedding_dim=32, seed=offset)
        publish_version(
            engine=engine,
            client=client,
            keys=keys,
            store_path=store_path,
            version=base + offset,
            model=model,
            trained_through_slot=base + offset,
            metrics={},
        )
        return base + offset

    # drivers start before the first version: the popular fallback must not fail either
    users = ["u1", "u17", "newbie", "stranger", "u150"]
    stop, logs = threading.Event(), [DriverLog() for _ in range(DRIVERS)]
    threads = [
        threading.Thread(target=_drive, args=(server.base_url, users, stop, log)) for log in logs
    ]
    for thread in threads:
        thread.start()
    try:
        for offset in range(N_VERSIONS):
            last = publish(offset)
            time.sleep(0.15)
        _wait_served(server.base_url, last)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        engine.dispose()
        client.close()

    failures = [failure for log in logs for failure in log.failures]
    assert failures == []
    assert sum(log.requests for log in logs) >= 100
    seen = {version for log in logs for version in log.versions}
    assert len(seen) >= 5 and max(seen) == last
    for log in logs:  # one client never sees the served version go back
        assert log.versions == sorted(log.versions)


def _wait_served(base_url: str, version: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{base_url}/v1/models/current").json()["served"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} was not served within {timeout_s} s")
