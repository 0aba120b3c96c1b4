"""The time-wise meta-update as the worker's trainer: one published version per archived slot.

Version N is trained through one slot and starts from the learner checkpoint stored with
version N-1, so every step reads only committed state. Each step is safe to repeat after a crash:

- killed before the version directory is renamed into place: nothing of it is visible, the slot
  is still `archived`, and the retry trains the same slot from the same checkpoint again;
- killed after the directory but before the SQL row: the retry finds the finished directory for
  the same version and keeps it (`write_version_files`), then registers it;
- killed after the SQL row but before the slot is marked `trained`: the retry finds the slot
  already registered and only makes sure the pointer has moved, so no slot is applied twice.

The checkpoint lives beside the served tensors, in `learner/` inside the version directory.
A slot whose update the guardrail rejects still gets a version: its rows are the previous ones
and only the popularity statistics move on, which is what the next slot must start from.
"""

import logging
import time
from pathlib import Path

import redis
import sqlalchemy as sa

from app.keys import RedisKeys
from app.services import model_store
from app.settings import Settings
from app.storage import repo
from app.worker.trainer import TrainOutcome
from models.batch import SlotBatch
from models.errors import EmptySlot
from models.meta import LearnerConfig, LearnerState, TimewiseMetaLearner

log = logging.getLogger("metarec.worker")

CHECKPOINT_DIR = "learner"


class MetaTrainer:
    """Runs `TimewiseMetaLearner.step` on each archived slot, oldest first, and publishes it."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        client: redis.Redis,
        config: LearnerConfig | None = None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.keys = RedisKeys(settings.redis_prefix)
        self.store_path = Path(settings.model_store_path)
        self.device = settings.torch_device
        self.learner = TimewiseMetaLearner(
            config or LearnerConfig(slot_seconds=float(settings.slot_seconds)), self.device
        )
        # the state after the newest registered version, kept between slots to skip a reload
        self._state: LearnerState | None = None
        self._state_version: int | None = None

    def train(self, slot_id: int) -> TrainOutcome | None:
        registered = repo.get_model_version_for_slot(self.engine, slot_id)
        if registered is not None:
            model_store.advance_pointer(self.client, self.keys, registered.version)
            return TrainOutcome(registered.version)

        newest = self._newest_version()
        if newest is not None and newest.trained_through_slot > slot_id:
            log.warning(
                "slot %d archived after version %d (through slot %d): its events stay in SQL "
                "and are not learned from",
                slot_id,
                newest.version,
                newest.trained_through_slot,
            )
            return TrainOutcome(None)

        columns = repo.interactions_of_slot(self.engine, slot_id)
        batch = SlotBatch(
            user_ids=columns.user_id,
            item_ids=columns.item_id,
            ts_s=columns.ts,
            values=columns.value,
            slot_id=slot_id,
        )
        return self._learn_and_publish(slot_id, batch, newest)

    def _learn_and_publish(
        self, slot_id: int, batch: SlotBatch, newest: repo.ModelVersionRecord | None
    ) -> TrainOutcome:
        started = time.perf_counter()
        state = self._state_after(newest)
        # the step changes the state in place: until the version is registered, the cached state
        # no longer matches any version, so a failure below must not leave it cached
        self._state, self._state_version = None, None
        try:
            state, report = self.learner.step(state, batch)
        except EmptySlot:
            return TrainOutcome(None)
        update_ms = (time.perf_counter() - started) * 1e3

        version = 1 if newest is None else newest.version + 1
        metrics: dict[str, object] = {**report.metrics, "choice": report.choice}
        published = model_store.publish_version(
            engine=self.engine,
            client=self.client,
            keys=self.keys,
            store_path=self.store_path,
            version=version,
            model=state.serving(),
            trained_through_slot=slot_id,
            metrics=metrics,
            write_extra=lambda directory: state.save(directory / CHECKPOINT_DIR),
        )
        self._state, self._state_version = state, published.version
        log.info(
            "slot %d learned: %d events, update %.0f ms, guardrail chose %s, version %d",
            slot_id,
            len(batch),
            update_ms,
            report.choice,
            published.version,
        )
        return TrainOutcome(published.version)

    def _state_after(self, newest: repo.ModelVersionRecord | None) -> LearnerState | None:
        if newest is None:
            return None
        if self._state is not None and self._state_version == newest.version:
            return self._state
        return LearnerState.load(Path(newest.path) / CHECKPOINT_DIR, self.device)

    def _newest_version(self) -> repo.ModelVersionRecord | None:
        newest = repo.list_model_versions(self.engine, limit=1)
        return newest[0] if newest else None
