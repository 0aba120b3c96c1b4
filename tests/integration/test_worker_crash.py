"""Killing the worker in the middle of archiving loses and duplicates nothing.

10,000 events go through the real `POST /v1/events` across five slots, then the same batches
again (all duplicates). A worker process archives them in small batches and is killed with
SIGKILL once some but not all events are in SQL; a second worker process takes over when the
dead one's lease runs out. Afterwards SQL holds each event exactly once and every slot is
archived.
"""

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from app.keys import RedisKeys
from app.settings import Settings
from tests.integration.ingest_support import running_app
from tests.integration.worker_support import (
    SlotRange,
    count_in_slots,
    interaction_rows,
    slot_states,
    user_event_counts,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 10_000
SLOTS = 5
BATCH = 1_000
SLOT_S = 60
ARCHIVE_BATCH = 25
LEASE_S = 1.5
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(redis_url: str, migrated_database_url: str, redis_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        database_url=migrated_database_url,
        redis_prefix=redis_prefix,
        clock="event",
        slot_seconds=SLOT_S,
        allowed_lateness_s=0.0,
    )


def _batches(slot_range: SlotRange, user_prefix: str) -> list[list[dict[str, object]]]:
    per_slot = EVENTS // SLOTS
    events = [
        {
            "event_id": f"{user_prefix}{n}",
            "user_id": f"{user_prefix}{n % 97}",
            "item_id": f"item-{n % 211}",
            "timestamp": slot_range.ts(n // per_slot, within_s=(n % per_slot) * SLOT_S / per_slot),
            "value": 1.0 + n % 3,
        }
        for n in range(EVENTS)
    ]
    return [events[start : start + BATCH] for start in range(0, EVENTS, BATCH)]


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "METAREC_REDIS_URL": settings.redis_url or "",
        "METAREC_DATABASE_URL": settings.database_url or "",
        "METAREC_REDIS_PREFIX": settings.redis_prefix,
        "METAREC_CLOCK": settings.clock,
        "METAREC_SLOT_SECONDS": str(settings.slot_seconds),
        "METAREC_ALLOWED_LATENESS_S": str(settings.allowed_lateness_s),
        "METAREC_ARCHIVE_BATCH_SIZE": str(ARCHIVE_BATCH),
        "METAREC_WORKER_LEASE_S": str(LEASE_S),
        "METAREC_WORKER_POLL_S": "0.05",
        "METAREC_TRAINER": "none",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "app.worker"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition: object, timeout_s: float, poll_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(poll_s)
    return False


def test_a_killed_worker_leaves_every_event_once_and_every_slot_archived(
    settings: Settings, store: redis.Redis, engine: sa.Engine
) -> None:
    slot_range = SlotRange.fresh(SLOTS, SLOT_S)
    user_prefix = f"crash-{uuid.uuid4().hex[:8]}-"
    batches = _batches(slot_range, user_prefix)

    # every batch twice: the second round is all duplicates
    with running_app(settings) as (client, _):
        for round_ in ("first", "again"):
            for batch in batches:
                response = client.post("/v1/events", json={"events": batch})
                assert response.status_code == 202, response.text
                expected = (BATCH, 0) if round_ == "first" else (0, BATCH)
                assert (response.json()["accepted"], response.json()["duplicates"]) == expected
        # one event after the range closes its last slot; it stays in its own open slot
        closer = {"user_id": "closer", "item_id": "x", "timestamp": slot_range.after_end_ts}
        assert client.post("/v1/events", json={"events": [closer]}).status_code == 202

    processes = [_start_worker(settings)]
    try:
        # somewhere in the middle: past a random point, before the end
        kill_after = random.randrange(EVENTS // 10, EVENTS * 8 // 10)
        in_flight = _wait_for(
            lambda: kill_after <= count_in_slots(engine, slot_range) < EVENTS, 20.0
        )
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait()
        killed_at = count_in_slots(engine, slot_range)
        print(f"\n[crash test] worker killed with {killed_at} of {EVENTS} events in SQL")
        assert in_flight, "the worker was never seen in the middle of archiving"
        assert killed_at < EVENTS, "the worker finished before it could be killed"

        processes.append(_start_worker(settings))
        done = _wait_for(
            lambda: slot_states(engine, slot_range) == slot_range.all_in("archived"), 20.0, 0.05
        )
        assert done, processes[1].stderr.read1().decode() if processes[1].stderr else ""
        processes[1].send_signal(signal.SIGTERM)
        assert processes[1].wait(timeout=10) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    rows = interaction_rows(engine, slot_range)
    posted = {event["event_id"] for batch in batches for event in batch}
    assert len(rows) == EVENTS
    assert {row.event_id for row in rows} == posted
    assert slot_states(engine, slot_range) == slot_range.all_in("archived")
    assert sum(user_event_counts(engine, user_prefix).values()) == EVENTS

    keys = RedisKeys(settings.redis_prefix)
    assert not any(store.exists(keys.slot_stream(slot_id)) for slot_id in slot_range.ids)
    assert store.zrange(keys.slots_index, 0, -1) == [str(slot_range.first + SLOTS)]
