"""The whole system on real data: MovieLens 100K replayed through `POST /v1/events` in event-time
mode with weekly slots, against a uvicorn API process and a worker process, over real Redis and
PostgreSQL. Versions must advance as slots close; a new user must move from `popular` to
`cold_start`; exclusions, categories and hidden items must hold; a pin must hold until removed."""

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from tests.integration.server_support import free_port, wait_until_up

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ML100K = REPO.parent / "shared" / "data" / "ml-100k" / "u.data"
WEEK_S = 7 * 24 * 3600
ADMIN_KEY = "e2e-admin-key"
WRITE_KEY = "e2e-write-key"


@dataclass
class Stack:
    http: httpx.Client
    processes: dict[str, subprocess.Popen[bytes]]


@pytest.fixture
def stack(
    redis_url: str, fresh_database_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Stack]:
    if not ML100K.is_file():
        pytest.skip(f"MovieLens 100K is not at {ML100K}; the end-to-end replay needs it")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("METAREC_")},
        "METAREC_REDIS_URL": redis_url,
        "METAREC_DATABASE_URL": fresh_database_url,
        "METAREC_REDIS_PREFIX": redis_prefix,
        "METAREC_DATA_DIR": str(tmp_path),
        "METAREC_MODEL_STORE_PATH": str(tmp_path / "models"),
        "METAREC_CLOCK": "event",
        "METAREC_SLOT_SECONDS": str(WEEK_S),
        "METAREC_ALLOWED_LATENESS_S": "0",
        "METAREC_MODEL_POLL_S": "0.5",
        "METAREC_WORKER_POLL_S": "0.2",
        "METAREC_ADMIN_API_KEYS": ADMIN_KEY,
        "METAREC_WRITE_API_KEYS": WRITE_KEY,
        "METAREC_DEVICE": "cpu",
    }
    api = [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory"]
    api += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    processes = {
        "api": subprocess.Popen(api, env=env, cwd=REPO),
        "worker": subprocess.Popen([sys.executable, "-m", "app.worker"], env=env, cwd=REPO),
    }
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=30.0, headers={"X-API-Key": WRITE_KEY}
    )
    try:
        wait_until_up(str(http.base_url).rstrip("/"), processes["api"], timeout_s=60.0)
        yield Stack(http, processes)
    finally:
        http.close()
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{redis_prefix}:*", count=1000):
            client.delete(key)
        client.close()


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _weeks(n_weeks: int) -> list[np.ndarray]:
    """The first `n_weeks` weekly slots of MovieLens 100K, rows (user, item, rating, ts)."""
    data = np.loadtxt(ML100K, dtype=np.int64)
    data = data[np.argsort(data[:, 3], kind="stable")]
    week = data[:, 3] // WEEK_S
    return [data[week == w] for w in range(int(week[0]), int(week[0]) + n_weeks)]


def _post(http: httpx.Client, rows: np.ndarray) -> None:
    for start in range(0, len(rows), 2_000):
        events = [
            {
                "user_id": f"u{user}",
                "item_id": str(item),
                "timestamp": int(ts),
                "value": float(rating),
                "event_id": f"ml-{user}-{item}-{ts}",
            }
            for user, item, rating, ts in rows[start : start + 2_000].tolist()
        ]
        response = http.post("/v1/events", json={"events": events})
        assert response.status_code == 202, response.text


def _recommend(http: httpx.Client, user_id: str, **params: Any) -> dict[str, Any]:
    response = http.get(f"/v1/users/{user_id}/recommendations", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _current(http: httpx.Client) -> dict[str, Any]:
    return dict(http.get("/v1/models/current").json())


def test_movielens_through_the_live_service(stack: Stack) -> None:
    http = stack.http
    weeks = _weeks(6)
    newcomer = "e2e-newcomer"

    # before any event the newcomer gets popularity
    before = _recommend(http, newcomer, k=10)
    assert before["strategy"] == "popular"

    # five weeks in: slots 0..3 close and become versions 1..4
    for rows in weeks[:5]:
        _post(http, rows)
    _wait_for(lambda: _current(http)["served"] == 4, 240.0, "version 4 to be served")
    versions = http.get("/v1/models").json()["versions"]
    assert [v["version"] for v in versions] == [4, 3, 2, 1]
    slots = [v["trained_through_slot"] for v in reversed(versions)]
    assert slots == sorted(slots) and len(set(slots)) == 4

    # still no events: popularity from the model; after three events: cold start that changes
    popular = _recommend(http, newcomer, k=10)
    assert popular["strategy"] == "popular" and popular["model_version"] == 4
    first_items = ["50", "181", "258"]
    last_ts = int(weeks[4][-1, 3])
    events = [
        {"user_id": newcomer, "item_id": item, "timestamp": last_ts, "event_id": f"new-{item}"}
        for item in first_items
    ]
    assert http.post("/v1/events", json={"events": events}).status_code == 202
    adapted = _recommend(http, newcomer, k=10)
    assert adapted["strategy"] == "cold_start"
    adapted_ids = [item["item_id"] for item in adapted["items"]]
    assert adapted_ids != [item["item_id"] for item in popular["items"]]
    assert not set(first_items) & set(adapted_ids)  # seen items are excluded by default

    # exclude, category and hidden items are honoured
    top = adapted_ids[0]
    excluded = _recommend(http, newcomer, k=10, exclude=top)
    assert top not in [item["item_id"] for item in excluded["items"]]
    comedy = [str(item) for item in range(100, 160)]
    for item_id in comedy:
        response = http.put(
            f"/v1/items/{item_id}",
            json={"categories": ["e2e-comedy"], "hidden": False, "attributes": {}},
        )
        assert response.status_code == 200, response.text
    in_category = _recommend(http, newcomer, k=10, category="e2e-comedy")
    assert in_category["items"] and {i["item_id"] for i in in_category["items"]} <= set(comedy)
    hide = http.put(f"/v1/items/{top}", json={"categories": [], "hidden": True, "attributes": {}})
    assert hide.status_code == 200, hide.text
    after_hiding = _recommend(http, newcomer, k=10)
    assert top not in [item["item_id"] for item in after_hiding["items"]]

    # a pin to version 1 holds while version 5 is published, until it is removed
    admin = {"X-API-Key": ADMIN_KEY}
    assert http.post("/v1/models/1/activate").status_code == 403  # a write key is no admin key
    assert http.post("/v1/models/1/activate", headers=admin).status_code == 200
    _wait_for(lambda: _current(http)["served"] == 1, 30.0, "the pin to version 1")
    _post(http, weeks[5])
    _wait_for(lambda: _current(http)["current"] == 5, 240.0, "version 5 to be published")
    time.sleep(1.5)  # past a pointer poll: the pinned process must not have moved
    assert _current(http)["served"] == 1
    assert _recommend(http, "u1", k=5)["model_version"] == 1
    assert http.delete("/v1/models/pin", headers=admin).status_code == 200
    _wait_for(lambda: _current(http)["served"] == 5, 30.0, "the unpinned API to follow version 5")
    assert _recommend(http, "u1", k=5)["model_version"] == 5
