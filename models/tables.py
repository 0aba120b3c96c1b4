"""ID tables that grow as new users and items arrive, and row storage that grows with them.

Rows are appended in the order ids first appear; nothing is preallocated from the future. Storage
doubles its capacity when full, so appending costs O(new rows) amortised, not O(table).
"""

import numpy as np
import torch


class IdIndex:
    """External string ids <-> dense rows 0..n-1."""

    def __init__(self, ids: list[str] | None = None) -> None:
        self.ids: list[str] = list(ids or [])
        self.rows: dict[str, int] = {key: row for row, key in enumerate(self.ids)}
        if len(self.rows) != len(self.ids):
            raise ValueError("duplicate ids in an IdIndex")

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: list[str]) -> np.ndarray:
        """Rows of `ids`, -1 for an id not in the index."""
        return np.fromiter((self.rows.get(key, -1) for key in ids), dtype=np.int64, count=len(ids))

    def plan(self, ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """Rows `ids` would get and the new ids in order of first appearance; changes nothing."""
        rows = np.empty(len(ids), dtype=np.int64)
        fresh: dict[str, int] = {}
        for position, key in enumerate(ids):
            row = self.rows.get(key)
            if row is None:
                row = fresh.setdefault(key, len(self.ids) + len(fresh))
            rows[position] = row
        return rows, list(fresh)

    def extend(self, new_ids: list[str]) -> None:
        for key in new_ids:
            if key in self.rows:
                raise ValueError(f"id {key!r} is already in the index")
            self.rows[key] = len(self.ids)
            self.ids.append(key)

    def truncate(self, n_rows: int) -> None:
        for key in self.ids[n_rows:]:
            del self.rows[key]
        del self.ids[n_rows:]

    def add(self, ids: list[str]) -> np.ndarray:
        """Rows of `ids`, appending the ones not seen before (in order of first appearance)."""
        rows = np.empty(len(ids), dtype=np.int64)
        for position, key in enumerate(ids):
            row = self.rows.get(key)
            if row is None:
                row = len(self.ids)
                self.rows[key] = row
                self.ids.append(key)
            rows[position] = row
        return rows


class RowTable:
    """A [n, *shape] tensor that grows by appending rows; `values` is the live view."""

    def __init__(self, values: torch.Tensor) -> None:
        self._data = values
        self._n = int(values.shape[0])

    @property
    def values(self) -> torch.Tensor:
        return self._data[: self._n]

    def __len__(self) -> int:
        return self._n

    def append(self, rows: torch.Tensor) -> None:
        n_new = int(rows.shape[0])
        if n_new == 0:
            return
        if self._n + n_new > self._data.shape[0]:
            capacity = max(2 * self._data.shape[0], self._n + n_new, 16)
            grown = self._data.new_zeros((capacity, *self._data.shape[1:]))
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n : self._n + n_new] = rows.to(self._data)
        self._n += n_new

    def truncate(self, n_rows: int) -> None:
        self._n = min(self._n, n_rows)


class SeenItems:
    """The item rows each user touched (the most recent `cap` of them), by user row.

    Ranking masks what a user already touched, so training and the guardrail mask it too.
    """

    def __init__(self, cap: int, lists: list[np.ndarray] | None = None) -> None:
        self.cap = cap
        self.lists: list[np.ndarray] = list(lists or [])

    def __len__(self) -> int:
        return len(self.lists)

    def grow(self, n_users: int) -> None:
        empty = np.zeros(0, dtype=np.int64)
        self.lists.extend(empty for _ in range(n_users - len(self.lists)))

    def truncate(self, n_users: int) -> None:
        del self.lists[n_users:]

    def extend(self, user_rows: np.ndarray, item_rows: np.ndarray) -> None:
        """Add events (in time order); a user's list keeps its `cap` most recent items."""
        order = np.argsort(user_rows, kind="stable")
        users, starts = np.unique(user_rows[order], return_index=True)
        # a repeated item may sit twice in a list: masking it twice is harmless and cheaper
        # than keeping every list distinct
        for user, chunk in zip(users.tolist(), np.split(item_rows[order], starts[1:]), strict=True):
            merged = np.concatenate([self.lists[user], chunk])
            self.lists[user] = merged[-self.cap :] if merged.shape[0] > self.cap else merged

    def csr(self, user_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [T+1], items [S]) of the users' lists, in the order of `user_rows`."""
        chosen = [self.lists[row] for row in user_rows.tolist()]
        lengths = np.fromiter((a.shape[0] for a in chosen), dtype=np.int64, count=len(chosen))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        items = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return indptr, items.astype(np.int64)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.csr(np.arange(len(self.lists)))

    @classmethod
    def from_arrays(cls, cap: int, indptr: np.ndarray, items: np.ndarray) -> "SeenItems":
        return cls(cap, [items[indptr[i] : indptr[i + 1]].copy() for i in range(len(indptr) - 1)])


class Reservoir:
    """A uniform sample of past (user row, item row) events of bounded size (reservoir sampling).

    Replaying a few of them beside each slot keeps the incremental fit close to what a full
    retrain would learn, at a cost set by the slot, not by the history.
    """

    def __init__(
        self,
        capacity: int,
        users: torch.Tensor | None = None,
        items: torch.Tensor | None = None,
        offered: int = 0,
    ) -> None:
        self.capacity = capacity
        self.users = users if users is not None else torch.zeros(0, dtype=torch.long)
        self.items = items if items is not None else torch.zeros(0, dtype=torch.long)
        self.offered = offered

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def sample(
        self, n_events: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_events = min(n_events, len(self))
        pick = torch.randperm(len(self), generator=generator)[:n_events].to(self.users.device)
        return self.users[pick], self.items[pick]

    def offer(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> None:
        """Each offered event ends up in the sample with probability capacity / offered."""
        room = max(self.capacity - len(self), 0)
        self.users = torch.cat([self.users, users[:room]])
        self.items = torch.cat([self.items, items[:room]])
        rest_users, rest_items = users[room:], items[room:]
        self.offered += room
        n_rest = int(rest_users.shape[0])
        if n_rest == 0 or self.capacity == 0:
            self.offered += n_rest
            return

        # event number n replaces a random slot with probability capacity / (n + 1)
        numbers = torch.arange(self.offered, self.offered + n_rest, dtype=torch.float64)
        draws = torch.rand(n_rest, generator=generator, dtype=torch.float64)
        slots = torch.floor(draws * (numbers + 1)).long()
        accepted = slots < self.capacity
        targets = slots[accepted].to(self.users.device)
        self.users[targets] = rest_users[accepted.to(rest_users.device)]
        self.items[targets] = rest_items[accepted.to(rest_items.device)]
        self.offered += n_rest
