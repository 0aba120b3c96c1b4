"""Item-side recency signals at several time scales, kept as running counts.

For every item: the count in the newest slot, counts decayed exponentially in event time with a
few half-lives (given in slots), and the all-time count. The features are `log1p` of these
counts; inside a softmax a constant shift of a feature cancels, so `log1p(count)` acts as the log
of a smoothed popularity share whatever the size of the slot.
"""

import torch

from models.tables import RowTable


class RecencyCounts:
    def __init__(
        self,
        half_lives_s: list[float],
        device: str | torch.device = "cpu",
        counts: torch.Tensor | None = None,
        clock_ts_s: float | None = None,
    ) -> None:
        self.half_lives_s = [float(h) for h in half_lives_s]
        width = len(self.half_lives_s) + 2  # newest slot, decays, all time
        if counts is None:
            counts = torch.zeros(0, width, device=device)
        self.table = RowTable(counts)
        self.clock_ts_s = clock_ts_s

    @property
    def n_features(self) -> int:
        return len(self.half_lives_s) + 2

    @property
    def counts(self) -> torch.Tensor:
        return self.table.values  # [N, 2 + H]

    def grow(self, n_items: int) -> None:
        missing = n_items - len(self.table)
        if missing > 0:
            self.table.append(self.counts.new_zeros(missing, self.n_features))

    def features(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        counts = self.counts if rows is None else self.counts[rows]
        return torch.log1p(counts)  # [N or len(rows), R]

    def advance(self, item_rows: torch.Tensor, ts_s: torch.Tensor) -> None:
        """Fold one slot of positive events into the counts (the slot becomes the newest)."""
        counts = self.counts
        new_clock_s = float(ts_s.max())
        if self.clock_ts_s is not None:
            new_clock_s = max(new_clock_s, self.clock_ts_s)
        ones = torch.ones(item_rows.shape[0], device=counts.device)

        # newest slot and all time
        counts[:, 0] = 0.0
        counts[:, 0].index_add_(0, item_rows, ones)
        counts[:, -1].index_add_(0, item_rows, ones)

        # decayed counts: age the old mass to the new clock, add each event by its own age
        for column, half_life_s in enumerate(self.half_lives_s, start=1):
            if self.clock_ts_s is not None:
                counts[:, column] *= 0.5 ** ((new_clock_s - self.clock_ts_s) / half_life_s)
            age_s = (new_clock_s - ts_s.double()).to(counts.dtype)  # float64 before the cast
            weights = torch.pow(0.5, age_s / half_life_s)
            counts[:, column].index_add_(0, item_rows, weights)
        self.clock_ts_s = new_clock_s

    def copy(self) -> "RecencyCounts":
        counts = self.counts.clone()
        return RecencyCounts(self.half_lives_s, counts=counts, clock_ts_s=self.clock_ts_s)
