"""The events of one closed slot, as the worker hands them to the learner."""

from dataclasses import dataclass

import numpy as np

from models.errors import EmptySlot, InvalidEvents


@dataclass(frozen=True)
class SlotBatch:
    """One slot's events; index i of every field describes event i.

    `values` are implicit-feedback strengths: an event with value > 0 is a positive interaction,
    an event with value <= 0 is kept for the clock but not learned from.
    """

    user_ids: list[str]
    item_ids: list[str]
    ts_s: np.ndarray  # [E] float64 unix seconds
    values: np.ndarray  # [E] float32
    slot_id: int | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def validate(self) -> None:
        """Raise a named error unless the batch can be learned from."""
        n_events = len(self.user_ids)
        if n_events == 0:
            raise EmptySlot("the slot holds no events", field="user_ids")
        for name, size in (
            ("item_ids", len(self.item_ids)),
            ("ts_s", int(np.asarray(self.ts_s).shape[0])),
            ("values", int(np.asarray(self.values).shape[0])),
        ):
            if size != n_events:
                raise InvalidEvents(f"{name} has {size} entries, user_ids has {n_events}", name)

        if not np.all(np.isfinite(np.asarray(self.ts_s, dtype=np.float64))):
            raise InvalidEvents("ts_s holds NaN or infinite timestamps", field="ts_s")
        if not np.all(np.isfinite(np.asarray(self.values, dtype=np.float64))):
            raise InvalidEvents("values holds NaN or infinite values", field="values")
        if not np.any(np.asarray(self.values) > 0):
            raise EmptySlot("the slot holds no event with a positive value", field="values")

    def sorted_by_time(self) -> "SlotBatch":
        order = np.argsort(np.asarray(self.ts_s), kind="stable")
        return SlotBatch(
            user_ids=[self.user_ids[i] for i in order],
            item_ids=[self.item_ids[i] for i in order],
            ts_s=np.asarray(self.ts_s, dtype=np.float64)[order],
            values=np.asarray(self.values, dtype=np.float32)[order],
            slot_id=self.slot_id,
        )
