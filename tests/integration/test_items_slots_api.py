"""`PUT/GET /v1/items/{item_id}` and `GET /v1/slots` through the real app."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.keys import RedisKeys
from app.settings import Settings
from app.storage.db import make_engine
from app.storage.migrate import upgrade_to_head
from app.worker import Worker
from tests.integration.ingest_support import running_app
from tests.integration.worker_support import SlotRange

pytestmark = pytest.mark.integration

SLOT_S = 10


@pytest.fixture(params=["postgresql", "sqlite"])
def settings(
    request: pytest.FixtureRequest,
    redis_url: str,
    migrated_database_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> Settings:
    database_url = migrated_database_url
    if request.param == "sqlite":
        database_url = f"sqlite:///{tmp_path / 'metarec.db'}"
        upgrade_to_head(database_url)
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        redis_prefix=redis_prefix,
        clock="event",
        slot_seconds=SLOT_S,
        allowed_lateness_s=0.0,
    )


@pytest.fixture
def item_id() -> str:
    return f"item-{uuid.uuid4().hex[:10]}"


def _put(client: TestClient, item_id: str, body: Any, **headers: str) -> Any:
    return client.put(f"/v1/items/{item_id}", json=body, headers=headers)


# items


def test_putting_an_item_stores_it_and_mirrors_it_into_redis(
    client: TestClient, store: redis.Redis, settings: Settings, item_id: str
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    body = {"categories": ["drama", "war"], "hidden": True, "attributes": {"year": 1997}}

    response = _put(client, item_id, body)

    assert response.status_code == 200, response.text
    stored = response.json()
    assert {k: stored[k] for k in body} == body and stored["item_id"] == item_id
    assert client.get(f"/v1/items/{item_id}").json() == stored
    assert store.sismember(keys.item_category("drama"), item_id)
    assert store.sismember(keys.item_category("war"), item_id)
    assert store.sismember(keys.items_hidden, item_id)
    assert store.get(keys.items_version) == "1"


def test_a_second_put_moves_the_item_out_of_its_old_categories(
    client: TestClient, store: redis.Redis, settings: Settings, item_id: str
) -> None:
    keys = RedisKeys(settings.redis_prefix)
    _put(client, item_id, {"categories": ["drama", "war"], "hidden": True})

    response = _put(client, item_id, {"categories": ["war", "comedy", "war"]})

    assert response.status_code == 200, response.text
    assert response.json()["categories"] == ["war", "comedy"]
    assert response.json()["hidden"] is False and response.json()["attributes"] == {}
    assert not store.sismember(keys.item_category("drama"), item_id)
    assert store.smembers(keys.item_category("war")) == {item_id}
    assert store.smembers(keys.item_category("comedy")) == {item_id}
    assert not store.sismember(keys.items_hidden, item_id)
    assert store.get(keys.items_version) == "2"


def test_an_unknown_item_is_a_404_naming_it(client: TestClient) -> None:
    response = client.get("/v1/items/no-such-item")

    assert response.status_code == 404
    assert response.json() == {"detail": "item_id: no item 'no-such-item'", "code": "not_found"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"categories": "drama"}, "categories"),
        ({"categories": ["drama", 7]}, "categories.1"),
        ({"categories": [""]}, "categories.0"),
        ({"categories": ["c" * 129]}, "categories.0"),
        ({"hidden": "yes"}, "hidden"),
        ({"attributes": [1, 2]}, "attributes"),
        ({"colour": "red"}, "colour"),
        ([], "body"),
    ],
)
def test_a_bad_item_body_is_a_422_naming_the_field(
    client: TestClient, item_id: str, body: Any, field: str
) -> None:
    response = _put(client, item_id, body)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_input"
    assert response.json()["detail"].startswith(f"{field}: ")
    assert client.get(f"/v1/items/{item_id}").status_code == 404


def test_a_bad_item_request_is_refused_before_anything_is_stored(
    client: TestClient, item_id: str
) -> None:
    too_long = _put(client, "i" * 129, {})
    not_json = client.put(
        f"/v1/items/{item_id}", content=b"{", headers={"content-type": "application/json"}
    )
    wrong_type = client.put(
        f"/v1/items/{item_id}", content=b"{}", headers={"content-type": "text/plain"}
    )

    assert (too_long.status_code, too_long.json()["detail"]) == (
        422,
        "item_id: longer than 128 characters",
    )
    assert not_json.status_code == 422 and not_json.json()["detail"].startswith("body: ")
    assert wrong_type.status_code == 415
    assert client.get(f"/v1/items/{item_id}").status_code == 404


def test_item_writes_need_a_write_key_when_keys_are_configured(
    settings: Settings, store: redis.Redis, item_id: str
) -> None:
    keyed = settings.model_copy(update={"write_api_keys": ["w-secret"]})
    with running_app(keyed) as (client, _):
        missing = _put(client, item_id, {})
        wrong = _put(client, item_id, {}, **{"X-API-Key": "nope"})
        right = _put(client, item_id, {}, **{"X-API-Key": "w-secret"})
        read = client.get(f"/v1/items/{item_id}")

    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
    assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden")
    assert right.status_code == 200 and read.status_code == 200


# slots


def _post(client: TestClient, slot_range: SlotRange, offsets: list[int], tag: str) -> None:
    events = [
        {
            "event_id": f"{tag}-{n}",
            "user_id": f"u{n}",
            "item_id": "x",
            "timestamp": slot_range.ts(o),
        }
        for n, o in enumerate(offsets)
    ]
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 202, response.text


def _slots(client: TestClient, slot_range: SlotRange, **params: Any) -> Any:
    params.setdefault("before", slot_range.first + slot_range.count)
    response = client.get("/v1/slots", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _archive_closed_slots(settings: Settings) -> None:
    async def one_pass() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        engine: sa.Engine = make_engine(settings.database_url or "")
        worker = Worker(settings, client, engine)
        assert await worker.lease.acquire()
        await worker.run_once()
        await worker.lease.release()
        await client.aclose()
        engine.dispose()

    asyncio.run(one_pass())


def test_slots_show_buffered_counters_then_the_archived_state(
    client: TestClient, settings: Settings
) -> None:
    slot_range = SlotRange.fresh(3, SLOT_S)
    first, second, third = slot_range.ids
    # three events in the first slot, two in the second, one in the third; then a late one
    _post(client, slot_range, [0, 0, 0, 1, 1, 2], "a")
    _post(client, slot_range, [0], "b")

    buffered = _slots(client, slot_range)
    counters = [(s["slot_id"], s["state"], s["events"], s["late"]) for s in buffered["slots"]]
    assert counters[:3] == [
        (third, "open", 2, 1),
        (second, "closed", 2, 0),
        (first, "closed", 3, 0),
    ]
    assert buffered["watermark"] == slot_range.ts(2) and buffered["slot_seconds"] == SLOT_S
    assert buffered["slots"][0]["start_ts"] == slot_range.ts(2)
    assert buffered["slots"][0]["end_ts"] == slot_range.ts(3)

    _archive_closed_slots(settings)

    archived = _slots(client, slot_range)["slots"]
    assert [(s["slot_id"], s["state"], s["events"]) for s in archived[:3]] == [
        (third, "open", 2),
        (second, "archived", 2),
        (first, "archived", 3),
    ]
    assert archived[1]["closed_at"] is not None and archived[1]["archived_at"] is not None


def test_slots_come_in_pages_of_limit(client: TestClient, settings: Settings) -> None:
    slot_range = SlotRange.fresh(5, SLOT_S)
    _post(client, slot_range, [0, 1, 2, 3, 4], "p")
    _archive_closed_slots(settings)

    first_page = _slots(client, slot_range, limit=2)
    second_page = _slots(client, slot_range, limit=2, before=first_page["next_before"])

    ids = slot_range.ids
    assert [s["slot_id"] for s in first_page["slots"]] == [ids[4], ids[3]]
    assert [s["slot_id"] for s in second_page["slots"]] == [ids[2], ids[1]]
    assert second_page["next_before"] == ids[1]
    assert client.get("/v1/slots", params={"limit": 0}).status_code == 422
    assert client.get("/v1/slots", params={"limit": 1001}).status_code == 422
