"""What a replay has seen so far: the item universe, per-slot counts, each user's past."""

import numpy as np
import scipy.sparse as sp

from models.batch import SlotBatch
from models.evaluation import Targets
from models.tables import IdIndex


class History:
    def __init__(self, recent_events: int = 50) -> None:
        self.items = IdIndex()
        self.slot_counts: list[np.ndarray] = []  # per past slot, counts over the universe
        self.user_seen: dict[str, set[int]] = {}
        self.user_recent: dict[str, list[str]] = {}  # item ids, oldest first
        self.recent_events = recent_events
        self._users: list[str] = []
        self._items: list[int] = []
        self._ts_s: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    @property
    def n_items(self) -> int:
        return len(self.items)

    def knows_user(self, user_id: str) -> bool:
        return user_id in self.user_seen

    def add(self, slot: SlotBatch) -> None:
        columns = self.items.add(slot.item_ids)
        counts = np.bincount(columns, minlength=self.n_items).astype(np.float64)
        self.slot_counts.append(counts)
        for user, item_id, column in zip(slot.user_ids, slot.item_ids, columns, strict=True):
            self.user_seen.setdefault(user, set()).add(int(column))
            recent = self.user_recent.setdefault(user, [])
            recent.append(item_id)
            if len(recent) > self.recent_events:
                del recent[0]
        self._users.extend(slot.user_ids)
        self._items.extend(columns.tolist())
        self._ts_s.append(np.asarray(slot.ts_s, dtype=np.float64))
        self._values.append(np.asarray(slot.values, dtype=np.float32))

    def counts(self, index: int = -1) -> np.ndarray:
        counts = np.zeros(self.n_items)
        if self.slot_counts:
            chosen = self.slot_counts[index]
            counts[: chosen.shape[0]] = chosen
        return counts

    def targets(self, slot: SlotBatch) -> Targets:
        """Users active in `slot` and the items they touched there and not before."""
        in_slot: dict[str, list[str]] = {}
        for user, item in zip(slot.user_ids, slot.item_ids, strict=True):
            in_slot.setdefault(user, []).append(item)

        users, columns, sizes, seen = [], [], [], []
        for user, item_ids in in_slot.items():
            before = self.user_seen.get(user, set())
            fresh = {item for item in item_ids if self.items.rows.get(item, -1) not in before}
            if not fresh:
                continue
            known = [self.items.rows[item] for item in fresh if item in self.items.rows]
            users.append(user)
            columns.append(np.asarray(sorted(known), dtype=np.int64))
            sizes.append(len(fresh))
            seen.append(np.asarray(sorted(before), dtype=np.int64))
        return Targets(users, columns, np.asarray(sizes, dtype=np.int64), seen)

    def all_events(self) -> SlotBatch:
        return SlotBatch(
            user_ids=list(self._users),
            item_ids=[self.items.ids[column] for column in self._items],
            ts_s=np.concatenate(self._ts_s) if self._ts_s else np.zeros(0),
            values=np.concatenate(self._values) if self._values else np.zeros(0, np.float32),
        )

    def user_item_matrix(self) -> tuple[sp.csr_matrix, dict[str, int]]:
        """Binary users x universe matrix of everything seen, and the user rows."""
        user_rows: dict[str, int] = {}
        rows = np.fromiter(
            (user_rows.setdefault(u, len(user_rows)) for u in self._users), dtype=np.int64
        )
        columns = np.asarray(self._items, dtype=np.int64)
        matrix = sp.csr_matrix(
            (np.ones(rows.shape[0], dtype=np.float32), (rows, columns)),
            shape=(len(user_rows), self.n_items),
        )
        matrix.data[:] = 1.0  # repeated events count once
        return matrix, user_rows
