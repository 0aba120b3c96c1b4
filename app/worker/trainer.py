"""The hook where a model update runs after each archived slot.

After a slot is archived, the worker hands its id to a `SlotTrainer`, oldest slot first, and
marks the slot `trained` when the trainer reports an outcome. A trainer reads the slot's events
with `app.storage.repo.interactions_of_slot`, updates the model, and publishes a version (model
store directory, `model_versions` row, `model_current` pointer, `model_channel` message) before
it returns. It runs in a thread, so it may block; it must be idempotent, because a crash between
publishing and `trained` being recorded makes the worker hand it the same slot again.

A trainer that returns None is not ready for the slot (for instance a time-wise meta-update that
waits for slot t+1 as its query set): the slot stays `archived` and is offered again on the
worker's next pass.
"""

from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from app.settings import Settings


@dataclass(frozen=True)
class TrainOutcome:
    """The result of training on one slot; `model_version` is None when nothing was published
    (a guardrail kept the serving model)."""

    model_version: int | None


class SlotTrainer(Protocol):
    def train(self, slot_id: int) -> TrainOutcome | None:
        """Train on archived slot `slot_id`; None leaves it archived, to be offered again."""
        ...


class NoTrainer:
    """The trainer of a deployment without a model update: every slot stays `archived`."""

    def train(self, slot_id: int) -> TrainOutcome | None:
        return None


def make_trainer(settings: Settings, engine: sa.Engine) -> SlotTrainer:
    """The trainer the worker process runs with: the time-wise meta-update unless turned off."""
    if settings.trainer == "none":
        return NoTrainer()

    import redis

    from app.worker.meta_trainer import MetaTrainer

    if not settings.redis_url:
        raise ValueError("make_trainer needs settings.redis_url; see app.embedded")
    return MetaTrainer(settings, engine, redis.Redis.from_url(settings.redis_url))
