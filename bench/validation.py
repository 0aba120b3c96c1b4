"""How long validating one full `POST /v1/events` body takes, by the project's parser and by the
pydantic alternatives it was chosen over (a benchmark, not a test; no service needed).

    python bench/validation.py [--events 10000] [--repeats 9]

Prints the median time per body for each way, as a markdown table.
"""

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NotRequired

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter
from typing_extensions import TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ingestion.event_ids import derived_event_id
from app.ingestion.validation import parse_events_body
from app.settings import Settings

Id = Annotated[StrictStr, Field(min_length=1, max_length=128)] | StrictInt


class EventModel(BaseModel):
    user_id: Id
    item_id: Id
    timestamp: StrictFloat | StrictInt | StrictStr | None = None
    value: StrictFloat | StrictInt = 1.0
    type: Annotated[StrictStr, Field(max_length=64)] | None = None
    event_id: Id | None = None


class EventsModel(BaseModel):
    events: Annotated[list[EventModel], Field(min_length=1, max_length=10_000)]


class EventDict(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[misc]
    user_id: Id
    item_id: Id
    timestamp: NotRequired[StrictFloat | StrictInt | StrictStr | None]
    value: NotRequired[StrictFloat | StrictInt]
    type: NotRequired[Annotated[StrictStr, Field(max_length=64)] | None]
    event_id: NotRequired[Id | None]


class EventsDict(TypedDict):
    events: Annotated[list[EventDict], Field(min_length=1, max_length=10_000)]


EVENTS_DICT = TypeAdapter(EventsDict)


def typed_dict_with_keys(body: bytes) -> list[tuple[str, str, str, float]]:
    """The TypedDict adapter plus the pass every way needs: timestamps and idempotency keys."""
    rows = []
    for event in EVENTS_DICT.validate_json(body)["events"]:
        user_id, item_id = str(event["user_id"]), str(event["item_id"])
        ts_s = float(event.get("timestamp") or 0.0)
        event_id = derived_event_id(user_id, item_id, ts_s, event.get("type") or "")
        rows.append((event_id, user_id, item_id, ts_s))
    return rows


def median_ms(run: Callable[[], Any], repeats: int) -> float:
    timings_ms = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings_ms.append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    now_s = time.time()
    rng = random.Random(0)
    events = [
        {
            "user_id": f"u{rng.randrange(1000)}",
            "item_id": f"i{rng.randrange(5000)}",
            "timestamp": now_s - rng.random() * 3600,
            "value": 1.0,
            "type": "click",
        }
        for _ in range(args.events)
    ]
    body = orjson.dumps({"events": events})
    settings = Settings()

    ways: dict[str, Callable[[], Any]] = {
        "orjson.loads alone (lower bound)": lambda: orjson.loads(body),
        "parse_events_body (checks, timestamps, keys)": lambda: parse_events_body(
            body, settings, now_s
        ),
        "pydantic BaseModel per event (checks only)": lambda: EventsModel.model_validate_json(body),
        "pydantic TypeAdapter on a TypedDict (checks only)": lambda: EVENTS_DICT.validate_json(
            body
        ),
        "TypedDict adapter + timestamps and keys": lambda: typed_dict_with_keys(body),
    }
    print(f"| {args.events:,} events, {len(body):,} bytes | median ms |")
    print("|---|---:|")
    for name, run in ways.items():
        print(f"| {name} | {median_ms(run, args.repeats):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
