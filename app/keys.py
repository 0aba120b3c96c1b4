"""Every Redis key and channel the project uses, in one place.

Keys of one slot share the hash tag `{slot_id}` so that Redis Cluster keeps them together.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "metarec"

    # slot buffers: a stream of events per slot, its counters, and an index of known slots
    def slot_stream(self, slot_id: int) -> str:
        return f"{self.prefix}:slot:{{{slot_id}}}:events"

    def slot_stats(self, slot_id: int) -> str:
        return f"{self.prefix}:slot:{{{slot_id}}}:stats"

    @property
    def slots_index(self) -> str:
        return f"{self.prefix}:slots"

    # the event-time clock: hash with max_event_ts and watermark (unix seconds, floats)
    @property
    def clock(self) -> str:
        return f"{self.prefix}:clock"

    def dedup(self, event_id: str) -> str:
        return f"{self.prefix}:dedup:{event_id}"

    # per-user state read by the serving side
    def user_recent(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}:recent"

    def user_seen(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}:seen"

    # item metadata mirrored from SQL for request-time filtering
    @property
    def items_hidden(self) -> str:
        return f"{self.prefix}:items:hidden"

    def item_category(self, category: str) -> str:
        return f"{self.prefix}:category:{category}"

    @property
    def items_version(self) -> str:
        return f"{self.prefix}:items:version"

    # model publication
    @property
    def model_current(self) -> str:
        return f"{self.prefix}:model:current"

    @property
    def model_pinned(self) -> str:
        return f"{self.prefix}:model:pinned"

    @property
    def model_channel(self) -> str:
        return f"{self.prefix}:model:events"

    @property
    def worker_lease(self) -> str:
        return f"{self.prefix}:worker:lease"
