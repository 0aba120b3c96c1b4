"""The worker's meta-update trainer against real PostgreSQL and Redis: versions, checkpoints,
resuming after a crash at each publishing step, and never learning a slot twice."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa

from app.keys import RedisKeys
from app.services import model_store
from app.settings import Settings
from app.storage import repo
from app.storage.db import make_engine
from app.worker.meta_trainer import CHECKPOINT_DIR, MetaTrainer
from models.meta import LearnerConfig, LearnerState
from models.synthetic import StreamSpec, drifting_stream

pytestmark = pytest.mark.integration

SLOT_SECONDS = 7 * 24 * 3600
SPEC = StreamSpec(n_slots=4, n_items=120, users_per_slot=40, events_per_user=5.0)
CONFIG = LearnerConfig(slot_seconds=float(SLOT_SECONDS), embedding_dim=8, epochs=1, cold_users=16)


def _empty_tables(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in ("interactions", "slots", "model_versions", "users"):
            conn.execute(sa.text(f"DELETE FROM {table}"))


@pytest.fixture
def engine(migrated_database_url: str) -> Iterator[sa.Engine]:
    """The session's database, emptied before and after: versions are numbered from 1."""
    engine = make_engine(migrated_database_url)
    _empty_tables(engine)
    yield engine
    _empty_tables(engine)
    engine.dispose()


@pytest.fixture
def client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{redis_prefix}:*", count=10_000):
        client.delete(key)
    client.close()


def _archive_stream(engine: sa.Engine) -> list[int]:
    """Put the synthetic stream into SQL as archived slots; returns their ids in order."""
    slot_ids = []
    for batch in drifting_stream(SPEC):
        slot_id = int(batch.ts_s[0] // SLOT_SECONDS)
        rows = [
            repo.InteractionRow(
                event_id=f"e{slot_id}-{i}",
                user_id=user,
                item_id=item,
                ts=float(ts),
                value=float(value),
                type=None,
                slot_id=slot_id,
            )
            for i, (user, item, ts, value) in enumerate(
                zip(batch.user_ids, batch.item_ids, batch.ts_s, batch.values, strict=True)
            )
        ]
        repo.insert_interactions(engine, rows)
        repo.record_slot_closed(
            engine, slot_id, slot_seconds=SLOT_SECONDS, events=len(rows), late=0, duplicates=0
        )
        repo.record_slot_archived(engine, slot_id)
        slot_ids.append(slot_id)
    return slot_ids


def _trainer(engine: sa.Engine, client: redis.Redis, prefix: str, store: Path) -> MetaTrainer:
    settings = Settings(
        redis_prefix=prefix, model_store_path=store, slot_seconds=SLOT_SECONDS, device="cpu"
    )
    return MetaTrainer(settings, engine, client, config=CONFIG)


def test_each_slot_becomes_the_next_version_with_its_checkpoint(
    engine: sa.Engine, client: redis.Redis, redis_prefix: str, tmp_path: Path
) -> None:
    slot_ids = _archive_stream(engine)
    trainer = _trainer(engine, client, redis_prefix, tmp_path)

    outcomes = [trainer.train(slot_id) for slot_id in slot_ids]

    assert [o.model_version for o in outcomes if o is not None] == [1, 2, 3, 4]
    assert int(client.get(RedisKeys(redis_prefix).model_current) or 0) == 4
    versions = repo.list_model_versions(engine)
    assert [v.trained_through_slot for v in reversed(versions)] == slot_ids
    assert all(np.isfinite(v.metrics["update_ms"]) for v in versions)
    state = LearnerState.load(model_store.version_dir(tmp_path, 4) / CHECKPOINT_DIR)
    assert state.slots_seen == len(slot_ids)


def test_a_slot_offered_again_is_not_learned_twice(
    engine: sa.Engine, client: redis.Redis, redis_prefix: str, tmp_path: Path
) -> None:
    slot_ids = _archive_stream(engine)
    trainer = _trainer(engine, client, redis_prefix, tmp_path)
    for slot_id in slot_ids[:2]:
        trainer.train(slot_id)

    # a restarted worker is handed slot 2 again, as after a crash before `trained` was recorded
    restarted = _trainer(engine, client, redis_prefix, tmp_path)
    again = restarted.train(slot_ids[1])
    following = restarted.train(slot_ids[2])

    assert again is not None and again.model_version == 2
    assert following is not None and following.model_version == 3
    state = LearnerState.load(model_store.version_dir(tmp_path, 3) / CHECKPOINT_DIR)
    assert state.slots_seen == 3


def test_a_crash_before_registering_resumes_from_the_last_registered_checkpoint(
    engine: sa.Engine,
    client: redis.Redis,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slot_ids = _archive_stream(engine)
    trainer = _trainer(engine, client, redis_prefix, tmp_path)
    trainer.train(slot_ids[0])

    # the process dies after the version directory exists but before its SQL row does
    def die(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(model_store, "register_version", die)
    with pytest.raises(SystemExit):
        trainer.train(slot_ids[1])
    assert model_store.version_dir(tmp_path, 2).is_dir()
    assert repo.get_model_version(engine, 2) is None
    monkeypatch.undo()

    # the same trainer (its in-memory state touched by the failed step) and a fresh one agree
    resumed = trainer.train(slot_ids[1])
    assert resumed is not None and resumed.model_version == 2
    state = LearnerState.load(model_store.version_dir(tmp_path, 2) / CHECKPOINT_DIR)
    assert state.slots_seen == 2
    assert _trainer(engine, client, redis_prefix, tmp_path).train(slot_ids[2]) is not None
    assert LearnerState.load(model_store.version_dir(tmp_path, 3) / CHECKPOINT_DIR).slots_seen == 3
