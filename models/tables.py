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
