"""Building, loading and warming the immutable serving snapshot."""

from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest
import torch

from app.services.snapshot import POPULAR_PREFIX, build_snapshot, load_snapshot, warm_snapshot
from models.coldstart import adapt_users
from models.synthetic import toy_serving_model


def test_build_indexes_ids_and_lays_out_items_by_dimension() -> None:
    model = toy_serving_model(n_users=30, n_items=120, embedding_dim=8)
    snapshot = build_snapshot(model, version=7, trained_through_slot=41)

    assert (snapshot.version, snapshot.trained_through_slot, snapshot.n_items) == (7, 41, 120)
    assert snapshot.item_rows["i17"] == 17 and snapshot.item_ids[17] == "i17"
    assert snapshot.user_rows["u29"] == 29
    assert snapshot.user_counts == [20] * 30
    assert snapshot.items_by_dim.shape == (model.dim, 120)
    assert snapshot.items_by_dim.is_contiguous()
    assert torch.equal(snapshot.model.item_matrix, model.item_matrix)

    user_vector = model.user_matrix[3]
    assert torch.allclose(snapshot.score_all(user_vector), model.item_matrix @ user_vector)
    rows = torch.tensor([5, 0, 99])
    assert torch.allclose(
        snapshot.score_rows(user_vector, rows), model.item_matrix[rows] @ user_vector
    )


def test_popular_prefix_is_ordered_by_popularity() -> None:
    model = toy_serving_model(n_items=3_000)
    snapshot = build_snapshot(model, version=1, trained_through_slot=0)

    assert snapshot.popular_rows.numel() == POPULAR_PREFIX
    popularity = model.popularity[snapshot.popular_rows]
    assert bool((popularity[:-1] >= popularity[1:]).all())
    assert float(popularity[-1]) >= float(
        model.popularity.sort(descending=True).values[POPULAR_PREFIX]
    )


def test_embedding_norms_cover_only_the_embedding_columns() -> None:
    model = toy_serving_model(n_items=50, embedding_dim=8)
    snapshot = build_snapshot(model, version=1, trained_through_slot=0)
    expected = model.item_matrix[:, :8].norm(dim=1)
    assert torch.allclose(snapshot.embedding_norms, expected)


def test_snapshot_is_frozen() -> None:
    snapshot = build_snapshot(toy_serving_model(), version=1, trained_through_slot=0)
    with pytest.raises(FrozenInstanceError):
        snapshot.version = 2  # type: ignore[misc]


def test_mismatched_tensors_are_refused() -> None:
    model = toy_serving_model(n_items=40)
    broken = replace(model, popularity=model.popularity[:-1])
    with pytest.raises(ValueError, match="item tensors"):
        build_snapshot(broken, version=1, trained_through_slot=0)
    too_wide = replace(model, embedding_dim=model.dim + 1)
    with pytest.raises(ValueError, match="embedding_dim"):
        build_snapshot(too_wide, version=1, trained_through_slot=0)


def test_load_round_trips_a_saved_model_and_warms(tmp_path: Path) -> None:
    model = toy_serving_model(n_users=10, n_items=64)
    model.save(tmp_path / "v000003")

    snapshot = load_snapshot(tmp_path / "v000003", version=3, trained_through_slot=12)
    assert snapshot.version == 3 and snapshot.load_ms > 0
    assert snapshot.item_ids == model.item_ids
    assert torch.allclose(snapshot.model.user_matrix, model.user_matrix)
    assert warm_snapshot(snapshot, adapt_users) > 0


def test_adaptation_runs_on_the_snapshot_layout() -> None:
    model = toy_serving_model(n_users=5, n_items=80)
    snapshot = build_snapshot(model, version=1, trained_through_slot=0)
    rows = torch.tensor([[3, 9, 11]])
    mask = torch.ones_like(rows, dtype=torch.bool)
    base = torch.tensor([-1])

    on_snapshot = adapt_users(snapshot.model, rows, mask, base)
    on_model = adapt_users(model, rows, mask, base)
    assert torch.allclose(on_snapshot, on_model, atol=1e-6)
