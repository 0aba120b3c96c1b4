"""Row tables, recency counts, sampled softmax candidates, seen masks and the slot fit."""

import math

import numpy as np
import pytest
import torch

from models.recency import RecencyCounts
from models.recommender import (
    Catalogue,
    FitConfig,
    SeenCsr,
    fit_rows,
    sample_candidates,
    seen_mask,
)
from models.tables import IdIndex, Reservoir, RowTable, SeenItems


def test_id_index_plans_without_changing_and_then_extends() -> None:
    index = IdIndex(["a", "b"])
    rows, fresh = index.plan(["b", "c", "a", "c", "d"])
    assert rows.tolist() == [1, 2, 0, 2, 3] and fresh == ["c", "d"]
    assert len(index) == 2
    index.extend(fresh)
    assert index.lookup(["d", "zz"]).tolist() == [3, -1]
    index.truncate(2)
    assert index.ids == ["a", "b"] and "c" not in index.rows


def test_row_table_grows_and_keeps_its_rows() -> None:
    table = RowTable(torch.zeros(0, 3))
    for n in range(1, 40):
        table.append(torch.full((1, 3), float(n)))
    assert len(table) == 39
    torch.testing.assert_close(table.values[:, 0], torch.arange(1, 40, dtype=torch.float32))
    table.truncate(10)
    assert table.values.shape == (10, 3)


def test_recency_counts_decay_by_event_time() -> None:
    day_s = 86400.0
    recency = RecencyCounts([day_s])
    recency.grow(3)
    recency.advance(torch.tensor([0, 0, 1]), torch.tensor([0.0, day_s, day_s], dtype=torch.float64))
    # newest slot, decayed with a one-day half-life (clock = newest event), all time
    torch.testing.assert_close(recency.counts[:, 0], torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(recency.counts[:, 1], torch.tensor([1.5, 1.0, 0.0]))
    recency.advance(torch.tensor([2]), torch.tensor([2 * day_s], dtype=torch.float64))
    torch.testing.assert_close(recency.counts[:, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(recency.counts[:, 1], torch.tensor([0.75, 0.5, 1.0]))
    torch.testing.assert_close(recency.counts[:, 2], torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(recency.features(), torch.log1p(recency.counts))


def test_sampled_candidates_keep_positives_and_correct_negatives() -> None:
    generator = torch.Generator().manual_seed(0)
    positives = torch.tensor([5, 9, 5, 700])
    full = sample_candidates(positives, 1000, 2048, 64, generator)
    assert full.rows is None and torch.equal(full.target, positives)

    sampled = sample_candidates(positives, 10_000, 2048, 64, generator)
    assert sampled.rows is not None and isinstance(sampled.correction, torch.Tensor)
    assert torch.equal(sampled.rows[sampled.target], positives)
    negatives = sampled.rows[3:]
    assert not torch.isin(negatives, positives).any()
    torch.testing.assert_close(sampled.correction[:3], torch.zeros(3))
    assert float(sampled.correction[3]) == pytest.approx(math.log((10_000 - 3) / 64))


def test_seen_mask_hides_earlier_items_but_never_the_positive() -> None:
    seen = SeenCsr(torch.tensor([0, 2, 3]), torch.tensor([1, 4, 2]))
    mask = seen_mask(seen, torch.tensor([0, 1, 0]), torch.tensor([4, 0, 3]), None, 6)
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 1] = True  # item 4 is user 0's positive here, so it stays in
    expected[1, 2] = True
    expected[2, 1] = expected[2, 4] = True
    assert torch.equal(mask, expected)

    candidates = torch.tensor([4, 3, 9, 1])
    mask = seen_mask(seen, torch.tensor([0]), torch.tensor([3]), candidates, 100)
    assert mask.tolist() == [[True, False, False, True]]


def test_seen_items_keep_the_most_recent_per_user() -> None:
    seen = SeenItems(cap=3)
    seen.grow(2)
    seen.extend(np.array([0, 1, 0, 0, 0]), np.array([5, 6, 7, 8, 9]))
    indptr, items = seen.csr(np.array([1, 0]))
    assert indptr.tolist() == [0, 1, 4] and items.tolist() == [6, 7, 8, 9]
    restored = SeenItems.from_arrays(3, *seen.to_arrays())
    assert [a.tolist() for a in restored.lists] == [[7, 8, 9], [6]]


def test_reservoir_stays_bounded_and_uniform() -> None:
    generator = torch.Generator().manual_seed(1)
    reservoir = Reservoir(capacity=500)
    for start in range(0, 20_000, 1000):
        events = torch.arange(start, start + 1000)
        reservoir.offer(events, events, generator)
    assert len(reservoir) == 500 and reservoir.offered == 20_000
    # a uniform sample of 0..19999 has its mean near 10000
    assert abs(float(reservoir.users.float().mean()) - 10_000) < 1_000


def test_fit_touches_only_the_slot_rows_and_lowers_its_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    catalogue = Catalogue(torch.randn(50, 8) * 0.1, torch.zeros(50), torch.zeros(50))
    item_rows = torch.tensor([3, 7, 11])
    users = torch.randn(4, 8) * 0.1
    event_user = torch.tensor([0, 0, 1, 2, 3, 3])
    event_item = torch.tensor([0, 1, 1, 2, 0, 2])
    config = FitConfig(epochs=30, batch_size=4, lr=0.05)

    def loss(u: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> float:
        emb = catalogue.item_emb.index_copy(0, item_rows, v)
        bias = catalogue.item_bias.index_copy(0, item_rows, b)
        logits = u[event_user] @ emb.T + bias
        return float(torch.nn.functional.cross_entropy(logits, item_rows[event_item]))

    before = loss(users, catalogue.item_emb[item_rows], catalogue.item_bias[item_rows])
    fitted = fit_rows(catalogue, users, item_rows, event_user, event_item, config, generator)
    assert fitted[1].shape == (3, 8) and fitted[0].shape == (4, 8)
    assert loss(*fitted) < before - 0.5
