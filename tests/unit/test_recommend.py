"""Strategy choice, masking, category filtering and top-k, checked against brute force."""

import asyncio

import orjson
import pytest
import torch

from app.api.recommendations import split_ids
from app.services.recommend import (
    COLD_START,
    PERSONALIZED,
    POPULAR,
    AdaptedVectors,
    RecentEvent,
    ScoringBatcher,
    adapt_one,
    choose_user_vector,
    parse_recent,
    rank_batch,
    rank_for_vector,
    rank_popular,
    rank_popular_list,
    rows_of,
    similar_items,
    top_k,
)
from app.services.snapshot import Snapshot, build_snapshot
from models.coldstart import adapt_users
from models.synthetic import toy_serving_model

SLOT_S = 3600
TRAINED_THROUGH = 10
NEW_FROM_TS = float((TRAINED_THROUGH + 1) * SLOT_S)


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    model = toy_serving_model(n_users=40, n_items=3_000, embedding_dim=16, seed=3)
    counts = model.user_counts.clone()
    counts[:5] = 2.0  # users u0..u4 are known from only two events each
    model = type(model)(**{**model.__dict__, "user_counts": counts})
    return build_snapshot(model, version=5, trained_through_slot=TRAINED_THROUGH)


def brute_force(
    scores: torch.Tensor, k: int, masked: set[int], allowed: set[int] | None = None
) -> list[int]:
    ranked = sorted(range(scores.numel()), key=lambda row: -float(scores[row]))
    keep = [r for r in ranked if r not in masked and (allowed is None or r in allowed)]
    return keep[:k]


def event(item_id: str, ts_s: float) -> RecentEvent:
    return RecentEvent(item_id, ts_s, 1.0)


# top-k and masking


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(500, generator=gen)
    masked = torch.randperm(500, generator=gen)[:60]

    values, rows = top_k(scores.clone(), 25, masked)
    assert rows.tolist() == brute_force(scores, 25, set(masked.tolist()))
    assert torch.equal(values, scores[rows])


def test_top_k_returns_fewer_when_the_mask_leaves_fewer() -> None:
    scores = torch.arange(6, dtype=torch.float32)
    values, rows = top_k(scores, 5, torch.tensor([5, 4, 3]))
    assert rows.tolist() == [2, 1, 0] and values.tolist() == [2.0, 1.0, 0.0]


def test_rank_for_vector_masks_and_filters_by_category(snapshot: Snapshot) -> None:
    user_vector = snapshot.model.user_matrix[7]
    scores = snapshot.model.item_matrix @ user_vector
    masked = {int(r) for r in torch.topk(scores, 10).indices[::2]}  # some of the very best
    category = set(range(0, 3_000, 7)) | set(masked)

    values, rows = rank_for_vector(snapshot, user_vector, 20, torch.tensor(sorted(masked)), None)
    assert rows.tolist() == brute_force(scores, 20, masked)
    assert torch.allclose(values, scores[rows])

    candidates = torch.tensor(sorted(category))
    values, rows = rank_for_vector(
        snapshot, user_vector, 20, torch.tensor(sorted(masked)), candidates
    )
    assert rows.tolist() == brute_force(scores, 20, masked, category)
    assert torch.allclose(values, scores[rows])


def test_a_large_category_scores_the_whole_catalogue_the_same(snapshot: Snapshot) -> None:
    user_vector = snapshot.model.user_matrix[1]
    scores = snapshot.model.item_matrix @ user_vector
    category = set(range(0, 3_000, 2))  # over a quarter of the catalogue: the full matvec path
    no_mask = torch.empty(0, dtype=torch.long)
    _, rows = rank_for_vector(snapshot, user_vector, 30, no_mask, torch.tensor(sorted(category)))
    assert rows.tolist() == brute_force(scores, 30, set(), category)


def test_rank_popular_fast_path_and_exhausted_prefix(snapshot: Snapshot) -> None:
    popularity = snapshot.model.popularity
    masked = snapshot.popular_rows[:15]
    values, rows = rank_popular(snapshot, 10, masked, None)
    assert rows.tolist() == brute_force(popularity, 10, set(masked.tolist()))
    assert torch.equal(values, popularity[rows])

    # a category of items outside the precomputed prefix forces the full ranking
    outside = sorted(set(range(3_000)) - set(snapshot.popular_rows.tolist()))[:50]
    outside_masked = torch.tensor(outside[:5])
    _, rows = rank_popular(snapshot, 10, outside_masked, torch.tensor(outside))
    assert rows.tolist() == brute_force(popularity, 10, set(outside[:5]), set(outside))

    # the whole prefix masked: the remaining items are still ranked exactly
    _, rows = rank_popular(snapshot, 10, snapshot.popular_rows, None)
    assert rows.tolist() == brute_force(popularity, 10, set(snapshot.popular_rows.tolist()))


def test_similar_items_is_cosine_on_the_embedding_columns(snapshot: Snapshot) -> None:
    embeddings = snapshot.model.item_matrix[:, :16]
    cosine = torch.nn.functional.cosine_similarity(embeddings, embeddings[42][None], dim=1)
    hidden = torch.tensor([int(torch.topk(cosine, 3).indices[1])])

    values, rows = similar_items(snapshot, 42, 10, hidden)
    assert rows.tolist() == brute_force(cosine, 10, {42, int(hidden[0])})
    assert torch.allclose(values, cosine[rows], atol=1e-5)


def test_rows_of_skips_unknown_ids(snapshot: Snapshot) -> None:
    assert rows_of(snapshot, ["i3", "nope", "i2999"]).tolist() == [3, 2999]


# strategy choice


def choose(
    snapshot: Snapshot, user_id: str, recent: list[RecentEvent]
) -> tuple[str, torch.Tensor | None]:
    return choose_user_vector(
        snapshot,
        user_id,
        recent,
        newer_than_ts=NEW_FROM_TS,
        cold_start_max_events=10,
        adapt=adapt_users,
    )


def test_unknown_user_without_events_gets_popular(snapshot: Snapshot) -> None:
    assert choose(snapshot, "stranger", []) == (POPULAR, None)
    # events on items the model does not know give nothing to adapt from
    assert choose(snapshot, "stranger", [event("brand-new-item", NEW_FROM_TS + 5)]) == (
        POPULAR,
        None,
    )


def test_unknown_user_with_events_is_adapted_from_them(snapshot: Snapshot) -> None:
    recent = [event("i12", 100.0), event("unknown", 90.0), event("i40", 80.0)]
    strategy, vector = choose(snapshot, "stranger", recent)
    expected = adapt_users(
        snapshot.model,
        torch.tensor([[12, 40]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([-1]),
    )
    assert strategy == COLD_START
    assert vector is not None and torch.allclose(vector, expected[0])
    assert not torch.allclose(vector, snapshot.model.adapt_params["user_init"])


def test_known_user_with_few_events_is_cold_start_from_their_row(snapshot: Snapshot) -> None:
    strategy, vector = choose(snapshot, "u2", [event("i7", 50.0)])
    expected = adapt_one(snapshot, adapt_users, [7], base_row=2)
    assert strategy == COLD_START and vector is not None and torch.allclose(vector, expected)

    strategy, vector = choose(snapshot, "u2", [])
    assert strategy == COLD_START and vector is not None
    assert torch.equal(vector, snapshot.model.user_matrix[2])


def test_warm_user_is_refreshed_only_by_events_newer_than_the_model(snapshot: Snapshot) -> None:
    row = snapshot.user_rows["u20"]
    strategy, vector = choose(snapshot, "u20", [event("i5", NEW_FROM_TS - 1)])
    assert strategy == PERSONALIZED and vector is not None
    assert torch.equal(vector, snapshot.model.user_matrix[row])

    recent = [
        event("i9", NEW_FROM_TS + 30),
        event("i8", NEW_FROM_TS + 10),
        event("i5", NEW_FROM_TS - 1),
    ]
    strategy, vector = choose(snapshot, "u20", recent)
    expected = adapt_one(snapshot, adapt_users, [9, 8], base_row=row)
    assert strategy == PERSONALIZED and vector is not None and torch.allclose(vector, expected)
    assert not torch.allclose(vector, snapshot.model.user_matrix[row])


# parsing and small helpers


def test_parse_recent_skips_malformed_entries() -> None:
    raw = [
        orjson.dumps({"item_id": "a", "ts": 10.5, "value": 2}).decode(),
        "not json",
        orjson.dumps({"item_id": "b"}).decode(),
        orjson.dumps({"item_id": 7, "ts": "11", "value": 1.0}).decode(),
    ]
    assert parse_recent(raw) == [RecentEvent("a", 10.5, 2.0), RecentEvent("7", 11.0, 1.0)]


def test_rank_popular_list_applies_every_filter() -> None:
    popular = [("a", 9.0), ("b", 8.0), ("c", 7.0), ("d", 6.0), ("e", 5.0), ("f", 4.0)]
    ids, scores = rank_popular_list(
        popular, 2, {"a"}, frozenset({"c"}), frozenset({"a", "c", "d", "f"})
    )
    assert (ids, scores) == (["d", "f"], [6.0, 4.0])
    assert rank_popular_list(popular, 3, set(), frozenset(), None)[0] == ["a", "b", "c"]


def test_split_ids_accepts_repeats_and_commas() -> None:
    assert split_ids(["a,b", " c ", "", "d,,e"]) == ("a", "b", "c", "d", "e")


# batched scoring


def test_rank_batch_matches_one_user_at_a_time(snapshot: Snapshot) -> None:
    gen = torch.Generator().manual_seed(11)
    vectors = snapshot.model.user_matrix[[3, 8, 21]]
    masked = [torch.randperm(3_000, generator=gen)[:n] for n in (0, 40, 400)]
    ranked = rank_batch(snapshot, vectors, [5, 20, 12], masked)

    for vector, k, mask, (values, rows) in zip(vectors, [5, 20, 12], masked, ranked, strict=True):
        scores = snapshot.model.item_matrix @ vector
        assert rows.tolist() == brute_force(scores, k, set(mask.tolist()))
        assert torch.allclose(values, scores[rows])


def test_batcher_scores_concurrent_requests_together(snapshot: Snapshot) -> None:
    batcher = ScoringBatcher(max_batch=4)
    no_mask = torch.empty(0, dtype=torch.long)
    other = build_snapshot(toy_serving_model(n_items=50, seed=9), version=6, trained_through_slot=0)

    async def ask_all() -> list[tuple[torch.Tensor, torch.Tensor]]:
        asks = [batcher.rank(snapshot, snapshot.model.user_matrix[n], 7, no_mask) for n in range(6)]
        asks.append(batcher.rank(other, other.model.user_matrix[0], 7, no_mask))
        return await asyncio.gather(*asks)

    results = asyncio.run(ask_all())
    assert (batcher.batches, batcher.scored) == (3, 7)  # 4 + 2 on one snapshot, 1 on the other
    for n, (_, rows) in enumerate(results[:6]):
        expected = brute_force(snapshot.model.item_matrix @ snapshot.model.user_matrix[n], 7, set())
        assert rows.tolist() == expected
    assert results[6][1].tolist() == brute_force(
        other.model.item_matrix @ other.model.user_matrix[0], 7, set()
    )


def test_adapted_vectors_are_reused_until_the_events_or_the_snapshot_change(
    snapshot: Snapshot,
) -> None:
    calls: list[list[list[int]]] = []

    def counting_adapt(model, item_rows, mask, base_rows):  # type: ignore[no-untyped-def]
        calls.append(item_rows.tolist())
        return adapt_users(model, item_rows, mask, base_rows)

    adapted = AdaptedVectors(max_entries=2)
    first = adapted.get(snapshot, counting_adapt, [4, 5], -1)
    assert torch.equal(adapted.get(snapshot, counting_adapt, [4, 5], -1), first)
    assert len(calls) == 1
    assert torch.allclose(first, adapt_one(snapshot, adapt_users, [4, 5], -1))

    adapted.get(snapshot, counting_adapt, [6, 4, 5], -1)  # a new event: adapted again
    adapted.get(snapshot, counting_adapt, [4, 5], 3)  # another user: evicts the oldest
    adapted.get(snapshot, counting_adapt, [4, 5], -1)
    assert len(calls) == 4

    other = build_snapshot(toy_serving_model(n_items=50, seed=2), version=9, trained_through_slot=0)
    adapted.get(other, counting_adapt, [4, 5], -1)
    assert len(calls) == 5
