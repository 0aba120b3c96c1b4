"""Validation of `POST /v1/events` bodies: what is accepted, and the message for each refusal."""

from typing import Any

import orjson
import pytest

from app.errors import InvalidInput
from app.ingestion.event_ids import derived_event_id
from app.ingestion.validation import MAX_REPORTED_ERRORS, Event, parse_events_body
from app.settings import Settings

NOW_S = 1_700_000_000.0
WALL = Settings(clock="wall", max_future_s=300.0)
EVENT_CLOCK = Settings(clock="event")


def parse(document: Any, settings: Settings = WALL) -> list[Event]:
    return parse_events_body(orjson.dumps(document), settings, NOW_S)


def refusal(document: Any, settings: Settings = WALL) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse(document, settings)
    return caught.value.detail


def one(**fields: Any) -> dict[str, Any]:
    return {"events": [{"user_id": "u1", "item_id": "i1", **fields}]}


def test_a_minimal_event_gets_defaults_and_the_server_clock() -> None:
    (event,) = parse(one())
    assert (event.user_id, event.item_id, event.ts_s, event.value, event.type) == (
        "u1",
        "i1",
        NOW_S,
        1.0,
        "",
    )
    assert len(event.event_id) == 32


def test_every_field_is_read() -> None:
    (event,) = parse(one(timestamp=1_600_000_000.25, value=-2, type="click", event_id="e-1"))
    assert event == Event("e-1", "u1", "i1", 1_600_000_000.25, -2.0, "click")


def test_integer_ids_become_strings() -> None:
    (event,) = parse({"events": [{"user_id": 42, "item_id": 7, "event_id": 9}]})
    assert (event.user_id, event.item_id, event.event_id) == ("42", "7", "9")


@pytest.mark.parametrize(
    ("raw", "expected_s"),
    [
        ("2023-11-14T22:13:20Z", 1_700_000_000.0),
        ("2023-11-14T22:13:20.5z", 1_700_000_000.5),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000.0),
        ("2023-11-14 22:13:20.123456789Z", 1_700_000_000.123456),
        (1_700_000_000, 1_700_000_000.0),
        (0, 0.0),
    ],
)
def test_timestamps_in_seconds_or_rfc3339(raw: Any, expected_s: float) -> None:
    (event,) = parse(one(timestamp=raw))
    assert event.ts_s == pytest.approx(expected_s, abs=1e-6)


def test_null_optional_fields_mean_absent() -> None:
    (event,) = parse(one(timestamp=None, value=None, type=None, event_id=None))
    assert (event.ts_s, event.value, event.type) == (NOW_S, 1.0, "")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"events": [{"item_id": "i1"}]}, "events[0].user_id: required"),
        ({"events": [{"user_id": "u1"}]}, "events[0].item_id: required"),
        (one(user_id=""), "events[0].user_id: must not be empty"),
        (one(item_id="   "), "events[0].item_id: must not be empty"),
        (one(user_id="u" * 129), "events[0].user_id: longer than 128 characters"),
        (one(event_id="e" * 129), "events[0].event_id: longer than 128 characters"),
        (one(event_id=""), "events[0].event_id: must not be empty"),
        (one(user_id=True), "events[0].user_id: must be a string or an integer, got a boolean"),
        (one(item_id=1.5), "events[0].item_id: must be a string or an integer, got a number"),
        (one(item_id=["x"]), "events[0].item_id: must be a string or an integer, got an array"),
        (one(value="3.5"), "events[0].value: must be a number, got a string"),
        (one(value=True), "events[0].value: must be a number, got a boolean"),
        (one(value={}), "events[0].value: must be a number, got an object"),
        (one(type=3), "events[0].type: must be a string, got a number"),
        (one(type="t" * 65), "events[0].type: longer than 64 characters"),
        (one(timestamp="yesterday"), "events[0].timestamp: 'yesterday' is not RFC 3339"),
        (one(timestamp="2024-02-30T00:00:00Z"), "timestamp: '2024-02-30T00:00:00Z' is not a valid"),
        (one(timestamp="2024-01-01T00:00:00"), "timestamp: '2024-01-01T00:00:00' is not RFC 3339"),
        (one(timestamp="1700000000"), "events[0].timestamp: '1700000000' is not RFC 3339"),
        (one(timestamp=True), "timestamp: must be unix seconds or an RFC 3339 string, got a bool"),
        (one(timestamp=-1), "events[0].timestamp: -1 is outside 1970..9999"),
        (one(timestamp="1969-12-31T23:59:59Z"), "is outside 1970..9999"),
        (one(timestamp=1_700_000_000_000), "outside 1970..9999 (milliseconds? send seconds)"),
        (one(timestamp=NOW_S + 301), "events[0].timestamp: 1700000301.0 is too far in the future"),
        (one(userid="u1"), "events[0].userid: unknown field; allowed: event_id, item_id,"),
        ({"events": ["u1"]}, "events[0]: expected an object with user_id and item_id"),
        ({"events": []}, "events: empty; send at least 1 event"),
        ({"events": {}}, "events: required, a list of 1 to 10000 events"),
        ({}, "events: required, a list of 1 to 10000 events"),
        ([], 'body: expected a JSON object {"events": [...]}'),
        ({"events": [], "extra": 1}, "body: unknown field 'extra'; expected only 'events'"),
    ],
)  # fmt: skip
def test_each_bad_input_is_refused_naming_the_field(document: Any, expected: str) -> None:
    assert expected in refusal(document)


def test_the_position_of_the_bad_event_is_named() -> None:
    events = [{"user_id": "u", "item_id": "i"}] * 3 + [{"user_id": "", "item_id": "i"}]
    assert refusal({"events": events}) == "events[3].user_id: must not be empty"


def test_several_problems_are_reported_up_to_a_limit() -> None:
    events = [{"user_id": "", "item_id": "i"}] * (MAX_REPORTED_ERRORS + 3)
    detail = refusal({"events": events})
    assert detail.count("must not be empty") == MAX_REPORTED_ERRORS
    assert detail.startswith("events[0].user_id") and f"events[{MAX_REPORTED_ERRORS - 1}]" in detail


def test_one_event_over_the_batch_limit_is_refused_naming_the_limit() -> None:
    events = [{"user_id": "u", "item_id": "i"}] * 10_001
    assert refusal({"events": events}) == (
        "events: 10001 events is over the limit of 10000 per request"
    )
    assert len(parse({"events": events[:10_000]})) == 10_000


def test_bodies_that_are_not_json() -> None:
    for body in (b"", b"{", b'{"events": [NaN]}', b"\xff\xfe"):
        with pytest.raises(InvalidInput, match=r"^body: "):
            parse_events_body(body, WALL, NOW_S)


def test_numbers_json_cannot_hold_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"^body: not valid JSON"):
        parse_events_body(
            b'{"events": [{"user_id": "u", "item_id": "i", "value": 1e999}]}', WALL, 0
        )


def test_the_future_is_bounded_only_on_the_wall_clock() -> None:
    far_future_s = NOW_S + 10 * 365 * 86_400
    assert "too far in the future" in refusal(one(timestamp=far_future_s), WALL)
    (event,) = parse(one(timestamp=far_future_s), EVENT_CLOCK)
    assert event.ts_s == far_future_s
    (event,) = parse(one(timestamp=NOW_S + 300), WALL)
    assert event.ts_s == NOW_S + 300


def test_limits_come_from_settings() -> None:
    narrow = Settings(max_id_chars=4, max_events_per_request=2)
    assert "longer than 4 characters" in refusal(one(user_id="abcde"), narrow)
    assert "over the limit of 2 per request" in refusal(
        {"events": [one()["events"][0]] * 3}, narrow
    )


def test_a_timestamped_event_without_id_gets_a_derived_one() -> None:
    (first,) = parse(one(timestamp="2023-11-14T22:13:20Z", type="view"))
    (again,) = parse(one(timestamp=1_700_000_000, type="view", value=5))
    assert first.event_id == again.event_id == derived_event_id("u1", "i1", NOW_S, "view")


def test_an_event_without_timestamp_or_id_gets_a_fresh_id_every_time() -> None:
    ids = {parse(one())[0].event_id for _ in range(50)}
    assert len(ids) == 50
