"""`POST /v1/events` through the real app into a real Redis, and the readers the worker uses."""

import asyncio
import logging
import math
import time
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from app.ingestion import (
    advance_wall_clock,
    buffer_slot,
    closed_slot_ids,
    read_clock,
    slot_of,
    slot_stats,
)
from app.ingestion import writer as writer_module
from app.ingestion.validation import Event
from app.ingestion.writer import EventWriter, write_events
from app.keys import RedisKeys
from app.settings import Settings
from tests.integration.ingest_support import running_app

pytestmark = pytest.mark.integration

SLOT_S = 100
LATENESS_S = 10.0


@pytest.fixture
def settings(redis_url: str, migrated_database_url: str, redis_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        redis_prefix=redis_prefix,
        clock="event",
        slot_seconds=SLOT_S,
        allowed_lateness_s=LATENESS_S,
        recent_events_per_user=3,
    )


def post(client: TestClient, events: list[dict[str, Any]], **headers: str) -> Any:
    return client.post("/v1/events", json={"events": events}, headers=headers)


def accepted(client: TestClient, events: list[dict[str, Any]]) -> dict[str, int]:
    response = post(client, events)
    assert response.status_code == 202, response.text
    answer: dict[str, int] = response.json()
    return answer


def ev(user: str, item: str, ts_s: float | None = None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"user_id": user, "item_id": item, **extra}
    if ts_s is not None:
        event["timestamp"] = ts_s
    return event


def test_events_land_in_the_buffers_of_their_slots(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    events = [ev(f"u{i % 7}", f"i{i}", 1000.0 + i, event_id=f"e{i}") for i in range(300)]

    assert accepted(client, events) == {"accepted": 300, "duplicates": 0, "late": 0}

    for slot_id in (10, 11, 12):
        assert store.xlen(keys.slot_stream(slot_id)) == 100
        assert store.hgetall(keys.slot_stats(slot_id)) == {"events": "100"}
    assert store.zrange(keys.slots_index, 0, -1, withscores=True) == [
        ("10", 10.0),
        ("11", 11.0),
        ("12", 12.0),
    ]
    assert store.hgetall(keys.clock) == {"max_event_ts": "1299", "watermark": "1289"}

    (_, first), *_ = store.xrange(keys.slot_stream(11), count=1)
    assert first == {
        "event_id": "e100",
        "user_id": "u2",
        "item_id": "i100",
        "ts": "1100.0",
        "value": "1.0",
        "type": "",
        "late": "0",
        "event_slot": "11",
    }


def test_late_events_are_kept_in_the_oldest_open_slot_and_counted(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    accepted(client, [ev("u", "i", 1299.0)])  # watermark 1289: slots up to 11 closed

    answer = accepted(client, [ev("u", "old", 1050.0, type="view"), ev("u", "new", 1250.0)])

    assert answer == {"accepted": 2, "duplicates": 0, "late": 1}
    entries = [fields for _, fields in store.xrange(keys.slot_stream(12))]
    late_entry = next(fields for fields in entries if fields["item_id"] == "old")
    assert (late_entry["late"], late_entry["event_slot"], late_entry["type"]) == ("1", "10", "view")
    assert not store.exists(keys.slot_stream(10))
    assert store.hgetall(keys.slot_stats(12)) == {"events": "3", "late": "1"}


@pytest.mark.parametrize(
    ("watermark", "ts_s"),
    [
        (1000.0, 999.999),  # slot 9 closed exactly at the watermark
        (999.999, 999.0),  # slot 9 still open a hair before its end
        (1000.0, 1000.0),
        (1234.5, 1099.0),
        (1234.5, 1200.0),
        (1234.5, 5.0),
        (-50.0, 0.0),  # before 1970 the watermark may be negative; slot -1 holds it
        (1_700_000_000.25, 1_699_999_900.0),
    ],
)
def test_the_script_routes_events_as_the_slot_arithmetic_does(
    settings: Settings, store: redis.Redis, redis_prefix: str, watermark: float, ts_s: float
) -> None:
    keys = RedisKeys(redis_prefix)
    store.hset(keys.clock, mapping={"max_event_ts": repr(watermark), "watermark": repr(watermark)})
    expected_slot, expected_late = buffer_slot(slot_of(ts_s, SLOT_S), watermark, SLOT_S)

    async def write() -> Any:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        try:
            event = Event("routed", "u", "i", ts_s, 1.0, "")
            return await write_events(client, keys, settings, [event], now_s=0.0)
        finally:
            await client.aclose()

    result = asyncio.run(write())
    assert result.late == int(expected_late)
    (_, fields), *_ = store.xrange(keys.slot_stream(expected_slot))
    assert fields["late"] == str(int(expected_late))
    assert fields["event_slot"] == str(slot_of(ts_s, SLOT_S))


def test_a_repeated_event_id_is_stored_once_and_counted_as_duplicate(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    twice = [ev("u", "i", 1000.0, event_id="same"), ev("u", "j", 1001.0, event_id="same")]

    assert accepted(client, twice) == {"accepted": 1, "duplicates": 1, "late": 0}
    assert accepted(client, twice) == {"accepted": 0, "duplicates": 2, "late": 0}

    assert store.xlen(keys.slot_stream(10)) == 1
    assert store.hgetall(keys.slot_stats(10)) == {"events": "1", "duplicates": "3"}
    assert store.ttl(keys.dedup("same")) > 0


def test_a_retried_timestamped_event_without_id_is_a_duplicate(client: TestClient) -> None:
    timestamped = [ev("u", "i", 1000.0), ev("u", "i", 1000.0, type="click")]
    assert accepted(client, timestamped)["accepted"] == 2
    assert accepted(client, timestamped) == {"accepted": 0, "duplicates": 2, "late": 0}

    untimestamped = [ev("u", "i")]
    assert accepted(client, untimestamped)["accepted"] == 1
    assert accepted(client, untimestamped)["accepted"] == 1


def test_a_full_batch_of_10000_events_is_stored_once(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    events = [ev(f"u{i % 500}", f"i{i % 1500}", 1000.0 + i * 0.05) for i in range(10_000)]

    assert accepted(client, events) == {"accepted": 10_000, "duplicates": 0, "late": 0}
    assert accepted(client, events) == {"accepted": 0, "duplicates": 10_000, "late": 0}

    slot_ids = [int(member) for member in store.zrange(keys.slots_index, 0, -1)]
    assert slot_ids == list(range(10, 15))
    assert sum(store.xlen(keys.slot_stream(slot_id)) for slot_id in slot_ids) == 10_000
    stats = [store.hgetall(keys.slot_stats(slot_id)) for slot_id in slot_ids]
    assert sum(int(s.get("events", 0)) for s in stats) == 10_000
    assert sum(int(s.get("duplicates", 0)) for s in stats) == 10_000


def test_each_user_keeps_recent_events_newest_first_and_seen_items(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    accepted(client, [ev("reader", f"book{i}", 1000.0 + i, value=i) for i in range(5)])
    accepted(client, [ev("reader", "book0", 1010.0, event_id="again")])

    recent = [orjson.loads(entry) for entry in store.lrange(keys.user_recent("reader"), 0, -1)]
    assert recent == [
        {"item_id": "book0", "ts": 1010.0, "value": 1.0},
        {"item_id": "book4", "ts": 1004.0, "value": 4.0},
        {"item_id": "book3", "ts": 1003.0, "value": 3.0},
    ]
    assert store.smembers(keys.user_seen("reader")) == {f"book{i}" for i in range(5)}


def test_the_wall_clock_stamps_closes_and_bounds_the_future(
    settings: Settings, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    wall = settings.model_copy(update={"clock": "wall", "slot_seconds": 60})
    with running_app(wall) as (client, _):
        before_s = time.time()
        assert accepted(client, [ev("u", "now")])["accepted"] == 1
        stale = [ev("u", "stale", before_s - 3600)]
        assert accepted(client, stale) == {"accepted": 1, "duplicates": 0, "late": 1}
        future = post(client, [ev("u", "soon", before_s + 3600)])

    assert future.status_code == 422
    assert future.json()["detail"].startswith("events[0].timestamp: ")
    max_event_ts, watermark = (
        float(x) for x in store.hmget(keys.clock, "max_event_ts", "watermark")
    )
    assert before_s <= max_event_ts <= time.time()
    assert watermark == pytest.approx(max_event_ts - LATENESS_S, abs=1.0)
    (_, entry), *_ = store.xrange(keys.slot_stream(slot_of(max_event_ts, 60)))
    assert entry["item_id"] == "now"


def test_the_worker_readers(settings: Settings, store: redis.Redis, redis_prefix: str) -> None:
    keys = RedisKeys(redis_prefix)
    wall = settings.model_copy(update={"clock": "wall"})

    async def scenario() -> None:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        try:
            assert await read_clock(client, keys) == (None, None)
            assert await advance_wall_clock(client, keys, settings, 5_000.0) == -math.inf
            assert await read_clock(client, keys) == (None, None)
            assert await slot_stats(client, keys, 10) == {"events": 0, "late": 0, "duplicates": 0}

            events = [Event(f"e{i}", "u", "i", 1000.0 + 50 * i, 1.0, "") for i in range(4)]
            await write_events(client, keys, settings, events, now_s=0.0)
            assert await read_clock(client, keys) == (1150.0, 1140.0)
            assert await closed_slot_ids(client, keys, SLOT_S, 1140.0) == [10]
            assert await closed_slot_ids(client, keys, SLOT_S, -math.inf) == []
            assert await slot_stats(client, keys, 11) == {"events": 2, "late": 0, "duplicates": 0}

            # the server clock moves the watermark in clock="wall", never backwards
            assert await advance_wall_clock(client, keys, wall, 1300.0) == 1290.0
            assert await advance_wall_clock(client, keys, wall, 1200.0) == 1290.0
            assert await closed_slot_ids(client, keys, SLOT_S, 1290.0) == [10, 11]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_concurrent_batches_store_each_event_exactly_once(
    settings: Settings, store: redis.Redis, redis_prefix: str
) -> None:
    keys = RedisKeys(redis_prefix)
    batches = [
        [Event(f"e{(b * 37 + i) % 400}", f"u{i % 9}", "i", 1000.0 + i, 1.0, "") for i in range(100)]
        for b in range(24)
    ]
    unique_ids = {event.event_id for batch in batches for event in batch}

    async def post_all() -> list[Any]:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        try:
            writes = [write_events(client, keys, settings, b, now_s=0.0) for b in batches]
            return await asyncio.gather(*writes)
        finally:
            await client.aclose()

    results = asyncio.run(post_all())
    assert sum(r.accepted for r in results) == len(unique_ids)
    assert sum(r.duplicates for r in results) == 24 * 100 - len(unique_ids)
    stored = [
        fields["event_id"]
        for slot_id in (10, 11)
        for _, fields in store.xrange(keys.slot_stream(slot_id))
    ]
    assert sorted(stored) == sorted(unique_ids)


def test_the_group_writer_shares_calls_and_answers_each_request(
    settings: Settings, store: redis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = RedisKeys(redis_prefix)
    requests = [
        [Event(f"e{(r * 5 + i) % 60}", "u", "i", 1000.0 + i, 1.0, "") for i in range(1 + r % 7)]
        for r in range(40)
    ]
    calls: list[int] = []
    real_store = writer_module._store

    async def counted_store(*args: Any) -> tuple[str, float]:
        calls.append(len(args[3]))
        return await real_store(*args)

    monkeypatch.setattr(writer_module, "_store", counted_store)

    async def post_all() -> list[Any]:
        client = aioredis.from_url(settings.redis_url or "", decode_responses=True)
        try:
            capped = settings.model_copy(update={"max_events_per_request": 20})
            writer = EventWriter(client, keys, capped)
            return await asyncio.gather(*(writer.write(events, 0.0) for events in requests))
        finally:
            await client.aclose()

    results = asyncio.run(post_all())
    unique_ids = {event.event_id for events in requests for event in events}
    total_events = sum(len(events) for events in requests)
    assert sum(calls) == total_events
    assert all(events <= 20 for events in calls)  # a call holds at most a full request
    assert len(calls) < len(requests) and len(calls) >= total_events / 20
    assert all(r.accepted + r.duplicates == len(e) for r, e in zip(results, requests, strict=True))
    assert sum(r.accepted for r in results) == len(unique_ids)
    assert store.xlen(keys.slot_stream(10)) == len(unique_ids)


def test_the_group_writer_hands_a_redis_failure_to_every_request(settings: Settings) -> None:
    async def post_all() -> list[Any]:
        client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        try:
            writer = EventWriter(client, RedisKeys("unused"), settings)
            events = [Event("e", "u", "i", 1000.0, 1.0, "")]
            writes = [writer.write(events, 0.0) for _ in range(5)]
            return await asyncio.gather(*writes, return_exceptions=True)
        finally:
            await client.aclose()

    outcomes = asyncio.run(post_all())
    assert all(isinstance(outcome, redis.ConnectionError) for outcome in outcomes)


def test_write_calls_need_the_write_key_when_keys_are_set(
    settings: Settings, store: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secured = settings.model_copy(
        update={"write_api_keys": ["w-secret-1"], "admin_api_keys": ["a-secret-2"]}
    )
    with running_app(secured) as (client, _):
        missing = post(client, [ev("u", "i", 1000.0)])
        wrong = post(client, [ev("u", "i", 1000.0)], **{"X-API-Key": "guess"})
        with_write_key = post(client, [ev("u", "i", 1000.0)], **{"X-API-Key": "w-secret-1"})
        with_admin_key = post(client, [ev("u", "j", 1000.0)], **{"X-API-Key": "a-secret-2"})
        not_ascii = client.post(
            "/v1/events", json={"events": [ev("u", "i", 1000.0)]}, headers={"X-API-Key": b"cl\xe9"}
        )

    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
    assert "X-API-Key" in missing.json()["detail"]
    assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden")
    assert "guess" not in wrong.text
    assert not_ascii.status_code == 403
    assert (with_write_key.status_code, with_admin_key.status_code) == (202, 202)
    assert not any("secret" in record.getMessage() for record in caplog.records)


def test_health_readiness_and_metrics(
    client: TestClient, store: redis.Redis, redis_prefix: str
) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"redis": "ok", "database": "ok", "model": "ok"}

    events = [ev("u", f"i{i}", 1000.0 + 3 * i) for i in range(100)]  # up to 1297: 10, 11 closed
    accepted(client, events)
    accepted(client, [*events[:5], ev("u", "late", 1001.0, event_id="late-1")])
    text = client.get("/metrics").text

    assert "metarec_events_accepted_total 101.0" in text
    assert "metarec_events_duplicate_total 5.0" in text
    assert "metarec_events_late_total 1.0" in text
    assert 'route="/v1/events",status="202"} 2.0' in text
    assert "metarec_watermark_seconds 1287.0" in text
    assert "metarec_closed_slots_pending 2.0" in text
    assert "metarec_slot_lag_seconds 187.0" in text  # watermark 1287 - end of slot 10
    assert "metarec_redis_up 1.0" in text


def test_a_lost_redis_is_reported_not_a_server_error(settings: Settings) -> None:
    with running_app(settings) as (client, app):
        working = app.state.redis
        app.state.redis = aioredis.from_url(
            "redis://127.0.0.1:1/0", decode_responses=True, socket_connect_timeout=0.5
        )
        try:
            ready = client.get("/readyz")
            write = post(client, [ev("u", "i", 1000.0)])
            scrape = client.get("/metrics")
        finally:
            app.state.redis = working

    assert ready.status_code == 503
    assert ready.json()["code"] == "unavailable"
    assert ready.json()["detail"].startswith("not ready: redis: ")
    assert ready.json()["checks"]["database"] == "ok"
    assert (write.status_code, write.json()["code"]) == (503, "unavailable")
    assert scrape.status_code == 200 and "metarec_redis_up 0.0" in scrape.text
