"""Every kind of bad `POST /v1/events` gets a 4xx naming the field or limit, and stores nothing."""

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.integration.ingest_support import running_app, snapshot

pytestmark = pytest.mark.integration

MAX_BODY_BYTES = 1_000_000
JSON = {"content-type": "application/json"}
GOOD = {"user_id": "u1", "item_id": "i1", "timestamp": 1_000_000.0}


@pytest.fixture
def client(
    redis_url: str, migrated_database_url: str, redis_prefix: str, store: redis.Redis
) -> Iterator[TestClient]:
    settings = Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        redis_prefix=redis_prefix,
        clock="wall",
        max_body_bytes=MAX_BODY_BYTES,
    )
    with running_app(settings) as (test_client, _):
        yield test_client


def events_body(*events: Any) -> bytes:
    return orjson.dumps({"events": list(events)})


def bad(**fields: Any) -> bytes:
    """A body of one good event and one with `fields` changed, so the index must be right."""
    return events_body(GOOD, {**GOOD, **fields})


def without(field: str) -> bytes:
    return events_body(GOOD, {k: v for k, v in GOOD.items() if k != field})


BAD_BODIES = {
    "missing user_id": (without("user_id"), "events[1].user_id: required"),
    "missing item_id": (without("item_id"), "events[1].item_id: required"),
    "empty user_id": (bad(user_id=""), "events[1].user_id: must not be empty"),
    "blank item_id": (bad(item_id="  "), "events[1].item_id: must not be empty"),
    "user_id over 128": (bad(user_id="x" * 129), "events[1].user_id: longer than 128 characters"),
    "item_id over 128": (bad(item_id="x" * 129), "events[1].item_id: longer than 128 characters"),
    "null user_id": (bad(user_id=None), "events[1].user_id: required"),
    "object item_id": (bad(item_id={"id": 1}), "events[1].item_id: must be a string or an int"),
    "text value": (bad(value="high"), "events[1].value: must be a number, got a string"),
    "boolean value": (bad(value=False), "events[1].value: must be a number, got a boolean"),
    "infinite value": (
        b'{"events": [{"user_id": "u", "item_id": "i", "value": 1e400}]}',
        "body: not valid JSON",
    ),
    "NaN value": (b'{"events": [{"user_id": "u", "item_id": "i", "value": NaN}]}', "body: "),
    "garbage timestamp": (bad(timestamp="soon"), "events[1].timestamp: 'soon' is not RFC 3339"),
    "impossible date": (bad(timestamp="2024-13-01T00:00:00Z"), "events[1].timestamp: "),
    "negative timestamp": (bad(timestamp=-5), "events[1].timestamp: -5 is outside 1970..9999"),
    "milliseconds": (bad(timestamp=1.7e12), "events[1].timestamp: 1700000000000.0 is outside"),
    "far future": (bad(timestamp=4.0e9), "events[1].timestamp: 4000000000.0 is too far in the"),
    "list timestamp": (bad(timestamp=[1]), "events[1].timestamp: must be unix seconds or an"),
    "long type": (bad(type="t" * 65), "events[1].type: longer than 64 characters"),
    "unknown field": (bad(rating=5), "events[1].rating: unknown field"),
    "event not an object": (events_body(GOOD, 7), "events[1]: expected an object"),
    "empty batch": (events_body(), "events: empty; send at least 1 event"),
    "no events key": (b"{}", "events: required, a list of 1 to 10000 events"),
    "events not a list": (b'{"events": "u1"}', "events: required, a list"),
    "top level list": (b"[]", "body: expected a JSON object"),
    "10,001 events": (
        events_body(*[GOOD] * 10_001),
        "events: 10001 events is over the limit of 10000 per request",
    ),
    "broken JSON": (b'{"events": [{"user_id": "u1",', "body: not valid JSON"),
    "empty body": (b"", "body: empty"),
    "not UTF-8": (b'{"events": [{"user_id": "\xff", "item_id": "i"}]}', "body: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_422_naming_the_field_and_store_nothing(
    case: str, client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    body, expected = BAD_BODIES[case]
    before = snapshot(store, redis_prefix)

    response = client.post("/v1/events", content=body, headers=JSON)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_input"
    assert response.json()["detail"].startswith(expected), response.json()["detail"]
    assert snapshot(store, redis_prefix) == before


def test_a_good_event_beside_a_bad_one_is_not_stored(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    ok = client.post(
        "/v1/events", content=events_body({**GOOD, "timestamp": 999_000.0}), headers=JSON
    )
    assert ok.status_code == 202
    before = snapshot(store, redis_prefix)
    assert before  # the state to keep is not empty

    assert client.post("/v1/events", content=bad(user_id=""), headers=JSON).status_code == 422
    assert snapshot(store, redis_prefix) == before


def test_a_body_over_the_limit_by_content_length_gets_413(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    body = events_body(*[{**GOOD, "item_id": "x" * 100}] * 10_000)
    assert len(body) > MAX_BODY_BYTES

    response = client.post("/v1/events", content=body, headers=JSON)

    assert response.status_code == 413
    assert response.json() == {
        "detail": f"body: {len(body)} bytes is over the limit of {MAX_BODY_BYTES} bytes",
        "code": "payload_too_large",
    }
    assert snapshot(store, redis_prefix) == {}


def test_a_streamed_body_over_the_limit_gets_413_while_reading(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    chunk = events_body(*[GOOD] * 1_000)

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk

    response = client.post("/v1/events", content=chunks(), headers=JSON)

    assert response.status_code == 413
    assert response.json()["detail"] == f"body: over the limit of {MAX_BODY_BYTES} bytes"
    assert snapshot(store, redis_prefix) == {}


@pytest.mark.parametrize(
    ("headers", "shown"),
    [
        ({"content-type": "text/plain"}, "text/plain"),
        (
            {"content-type": "application/x-www-form-urlencoded"},
            "application/x-www-form-urlencoded",
        ),
        ({}, "none"),
    ],
)
def test_a_body_that_is_not_json_gets_415(
    headers: dict[str, str], shown: str, client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    response = client.post("/v1/events", content=events_body(GOOD), headers=headers)

    assert response.status_code == 415
    assert response.json() == {
        "detail": f"content-type: {shown} is not supported; send application/json",
        "code": "unsupported_media_type",
    }
    assert snapshot(store, redis_prefix) == {}


def test_json_with_a_charset_is_accepted(client: TestClient) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    response = client.post("/v1/events", content=events_body(GOOD), headers=headers)
    assert response.status_code == 202
