"""Parsing and validating a `POST /v1/events` body into events ready for the write path.

A body is `{"events": [event, ...]}` with 1 to `max_events_per_request` events; an event is

    {"user_id": str | int, "item_id": str | int,          required, 1..max_id_chars characters
     "timestamp": number | str,                            optional: unix seconds or RFC 3339
     "value": number,                                      optional, finite, default 1.0
     "type": str,                                          optional, up to 64 characters
     "event_id": str | int}                                optional idempotency key

Unknown fields are refused so that a misspelt `timestamp` is not silently replaced by the server
clock. Every problem is reported as `events[i].field: what is wrong`, a few at a time.

The checks are written out by hand, with a fast path per field for well-formed input. On a
10,000-event body they take about 20 ms including the idempotency keys, as fast as pydantic
(a TypeAdapter on a TypedDict, plus the same pass for keys and timestamps) and with messages in
the form the API documents (see docs/benchmarks.md, "Ingestion").
"""

import math
import re
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from app.errors import InvalidInput
from app.ingestion.event_ids import derived_event_id, random_event_id
from app.settings import Settings

EVENT_FIELDS = frozenset({"user_id", "item_id", "timestamp", "value", "type", "event_id"})
BODY_FIELDS = frozenset({"events"})
MAX_TYPE_CHARS = 64
# 10000-01-01T00:00:00Z, the first instant RFC 3339 cannot write
MAX_TS_S = 253_402_300_800.0
MAX_REPORTED_ERRORS = 5

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)


class Event(NamedTuple):
    """One validated event; `type` is "" when the client gave none."""

    event_id: str
    user_id: str
    item_id: str
    ts_s: float
    value: float
    type: str


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def parse_events_body(body: bytes, settings: Settings, now_s: float) -> list[Event]:
    """Decode and validate a whole body; raises `InvalidInput` naming each field at fault.

    `now_s` stamps events without a timestamp and, in clock="wall", bounds how far in the
    future a timestamp may lie (`max_future_s`).
    """
    raw_events = _raw_events(_decode(body), settings.max_events_per_request)
    latest_ts_s = now_s + settings.max_future_s if settings.clock == "wall" else MAX_TS_S

    events: list[Event] = []
    errors: list[str] = []
    for index, raw in enumerate(raw_events):
        try:
            events.append(_event(raw, settings.max_id_chars, now_s, latest_ts_s))
        except _FieldError as exc:
            errors.append(f"events[{index}]{exc.field}: {exc.message}")
            if len(errors) == MAX_REPORTED_ERRORS:
                break

    if errors:
        raise InvalidInput("; ".join(errors))
    return events


def _decode(body: bytes) -> Any:
    if not body:
        raise InvalidInput('body: empty; expected {"events": [...]}')
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from None


def _raw_events(document: Any, max_events: int) -> list[Any]:
    if not isinstance(document, dict):
        raise InvalidInput('body: expected a JSON object {"events": [...]}')
    unknown = document.keys() - BODY_FIELDS
    if unknown:
        raise InvalidInput(f"body: unknown field {sorted(unknown)[0]!r}; expected only 'events'")

    raw_events = document.get("events")
    if not isinstance(raw_events, list):
        raise InvalidInput(f"events: required, a list of 1 to {max_events} events")
    if not raw_events:
        raise InvalidInput("events: empty; send at least 1 event")
    if len(raw_events) > max_events:
        raise InvalidInput(
            f"events: {len(raw_events)} events is over the limit of {max_events} per request"
        )
    return raw_events


def _event(raw: Any, max_id_chars: int, now_s: float, latest_ts_s: float) -> Event:
    # each field has a fast path for the common well-formed case; anything else goes through
    # the full check, which also writes the message
    if type(raw) is not dict or not EVENT_FIELDS.issuperset(raw):
        raise _shape_error(raw)

    user_id = raw.get("user_id")
    if type(user_id) is not str or not 0 < len(user_id) <= max_id_chars or user_id.isspace():
        user_id = _identifier(user_id, "user_id", max_id_chars)
    item_id = raw.get("item_id")
    if type(item_id) is not str or not 0 < len(item_id) <= max_id_chars or item_id.isspace():
        item_id = _identifier(item_id, "item_id", max_id_chars)

    raw_ts = raw.get("timestamp")
    if type(raw_ts) is float and 0.0 <= raw_ts <= latest_ts_s and raw_ts < MAX_TS_S:
        ts_s = raw_ts
    else:
        ts_s = now_s if raw_ts is None else _timestamp(raw_ts, latest_ts_s)
    value = raw.get("value")
    if type(value) is not float or not math.isfinite(value):
        value = _value(value)
    event_type = raw.get("type")
    if type(event_type) is not str or len(event_type) > MAX_TYPE_CHARS:
        event_type = _event_type(event_type)

    raw_event_id = raw.get("event_id")
    if raw_event_id is not None:
        event_id = _identifier(raw_event_id, "event_id", max_id_chars)
    elif raw_ts is not None:
        event_id = derived_event_id(user_id, item_id, ts_s, event_type)
    else:
        event_id = random_event_id()
    return Event(event_id, user_id, item_id, ts_s, value, event_type)


def _shape_error(raw: Any) -> _FieldError:
    if type(raw) is not dict:
        return _FieldError("", "expected an object with user_id and item_id")
    unknown = sorted(raw.keys() - EVENT_FIELDS)[0]
    allowed = ", ".join(sorted(EVENT_FIELDS))
    return _FieldError(f".{unknown}", f"unknown field; allowed: {allowed}")


def _identifier(raw: Any, field: str, max_id_chars: int) -> str:
    kind = type(raw)
    if kind is str:
        if not raw or raw.isspace():
            raise _FieldError(f".{field}", "must not be empty")
        if len(raw) > max_id_chars:
            raise _FieldError(f".{field}", f"longer than {max_id_chars} characters")
        return raw
    if kind is int:
        return str(raw)
    if raw is None:
        raise _FieldError(f".{field}", "required")
    raise _FieldError(f".{field}", f"must be a string or an integer, got {_json_kind(raw)}")


def _timestamp(raw: Any, latest_ts_s: float) -> float:
    kind = type(raw)
    if kind is float or kind is int:
        ts_s = float(raw)
    elif kind is str:
        ts_s = _rfc3339_s(raw)
    else:
        raise _FieldError(
            ".timestamp", f"must be unix seconds or an RFC 3339 string, got {_json_kind(raw)}"
        )

    if not 0.0 <= ts_s < MAX_TS_S:
        hint = " (milliseconds? send seconds)" if ts_s >= MAX_TS_S else ""
        raise _FieldError(".timestamp", f"{raw!r} is outside 1970..9999{hint}")
    if ts_s > latest_ts_s:
        raise _FieldError(".timestamp", f"{raw!r} is too far in the future")
    return ts_s


def _rfc3339_s(raw: str) -> float:
    if _RFC3339.fullmatch(raw) is None:
        raise _FieldError(".timestamp", f"{raw[:40]!r} is not RFC 3339 (like 2024-05-01T12:00:00Z)")
    try:
        return datetime.fromisoformat(raw.upper()).timestamp()
    except ValueError as exc:
        raise _FieldError(".timestamp", f"{raw!r} is not a valid date and time ({exc})") from None


def _value(raw: Any) -> float:
    if raw is None:
        return 1.0
    kind = type(raw)
    if kind is not float and kind is not int:
        raise _FieldError(".value", f"must be a number, got {_json_kind(raw)}")
    value = float(raw)
    if not math.isfinite(value):
        raise _FieldError(".value", "must be finite")
    return value


def _event_type(raw: Any) -> str:
    if raw is None:
        return ""
    if type(raw) is not str:
        raise _FieldError(".type", f"must be a string, got {_json_kind(raw)}")
    if len(raw) > MAX_TYPE_CHARS:
        raise _FieldError(".type", f"longer than {MAX_TYPE_CHARS} characters")
    return raw


def _json_kind(raw: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "a number", float: "a number"}
    names |= {list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(raw), type(raw).__name__)
