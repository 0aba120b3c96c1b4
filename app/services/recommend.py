"""Answering one recommendation request from the served snapshot and the user's state in Redis.

Per request: one Redis pipeline (the user's recent events, their seen set, the items version),
the choice of strategy and user vector, one matvec over the item matrix (or over a category's
rows), masked items set to -inf, and a top-k. Hidden items and category members are cached in
the process and refetched only when `items_version` moves.

Strategies: `personalized` for a user the model knows from at least `cold_start_max_events`
events (their row, refreshed by their events newer than the model); `cold_start` for a user the
model does not know or knows from fewer events (adapted from their recent events); `popular`
when there is nothing to adapt from, or no model yet.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import torch

from app.keys import RedisKeys
from app.services.snapshot import Adapter, Snapshot

log = logging.getLogger(__name__)

PERSONALIZED, COLD_START, POPULAR = "personalized", "cold_start", "popular"
_MAX_CACHED_CATEGORIES = 256


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int = 20
    exclude_seen: bool = True
    exclude: tuple[str, ...] = ()
    category: str | None = None


@dataclass(frozen=True)
class RecentEvent:
    item_id: str
    ts_s: float
    value: float


@dataclass(frozen=True)
class UserState:
    recent: list[RecentEvent]  # newest first
    seen: set[str]
    items_version: int


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    item_ids: list[str]
    scores: list[float]
    model_version: int | None
    strategy: str
    recommendation_id: str

    def to_body(self) -> dict[str, object]:
        items = [
            {"item_id": item_id, "score": score}
            for item_id, score in zip(self.item_ids, self.scores, strict=True)
        ]
        return {
            "user_id": self.user_id,
            "items": items,
            "model_version": self.model_version,
            "strategy": self.strategy,
            "recommendation_id": self.recommendation_id,
        }


# the user's state: one pipeline


async def read_user_state(
    client: aioredis.Redis, keys: RedisKeys, user_id: str, *, with_seen: bool
) -> UserState:
    pipe = client.pipeline(transaction=False)
    pipe.lrange(keys.user_recent(user_id), 0, -1)
    pipe.get(keys.items_version)
    if with_seen:
        pipe.smembers(keys.user_seen(user_id))
    replies = await pipe.execute()

    seen = set(replies[2]) if with_seen else set()
    return UserState(parse_recent(replies[0]), seen, int(replies[1] or 0))


def parse_recent(raw_entries: Iterable[str]) -> list[RecentEvent]:
    """Decode the JSON entries of a user_recent list; an entry that does not decode is skipped."""
    events = []
    for raw in raw_entries:
        try:
            entry = orjson.loads(raw)
            events.append(
                RecentEvent(str(entry["item_id"]), float(entry["ts"]), float(entry["value"]))
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return events


# item filters cached per items_version


class ItemFilters:
    """Hidden items and category members, and their rows in a snapshot, per items version.

    The cache only moves forward: a request that read an older items version than the cache
    holds uses the newer sets, which is what it would have read a moment later anyway.
    """

    def __init__(self) -> None:
        self._items_version = -1
        self._hidden: frozenset[str] = frozenset()
        self._categories: dict[str, frozenset[str]] = {}
        self._rows_snapshot: Snapshot | None = None
        self._rows: dict[str, torch.Tensor] = {}

    async def hidden_ids(
        self, client: aioredis.Redis, keys: RedisKeys, items_version: int
    ) -> frozenset[str]:
        if items_version > self._items_version:
            hidden = await client.smembers(keys.items_hidden)
            self._advance(items_version, frozenset(str(item_id) for item_id in hidden))
        return self._hidden

    async def category_ids(
        self, client: aioredis.Redis, keys: RedisKeys, items_version: int, category: str
    ) -> frozenset[str]:
        await self.hidden_ids(client, keys, items_version)
        members = self._categories.get(category)
        if members is None:
            members = frozenset(
                str(item_id) for item_id in await client.smembers(keys.item_category(category))
            )
            if len(self._categories) >= _MAX_CACHED_CATEGORIES:
                self._categories.clear()
            self._categories[category] = members
        return members

    def rows(self, snapshot: Snapshot, name: str, ids: frozenset[str]) -> torch.Tensor:
        """The snapshot rows of a cached id set (`name` is `hidden` or `category:<name>`)."""
        if snapshot is not self._rows_snapshot:
            self._rows_snapshot, self._rows = snapshot, {}
        rows = self._rows.get(name)
        if rows is None:
            rows = rows_of(snapshot, ids)
            self._rows[name] = rows
        return rows

    def _advance(self, items_version: int, hidden: frozenset[str]) -> None:
        if items_version <= self._items_version:
            return  # a concurrent request refreshed it first
        self._items_version, self._hidden = items_version, hidden
        self._categories, self._rows = {}, {}


def rows_of(snapshot: Snapshot, ids: Iterable[str]) -> torch.Tensor:
    """Rows of the ids the snapshot knows, as a LongTensor on its device."""
    item_rows = snapshot.item_rows
    rows = [item_rows[item_id] for item_id in ids if item_id in item_rows]
    return torch.tensor(rows, dtype=torch.long, device=snapshot.device)


# choosing the user vector


def choose_user_vector(
    snapshot: Snapshot,
    user_id: str,
    recent: list[RecentEvent],
    *,
    newer_than_ts: float,
    cold_start_max_events: int,
    adapt: Adapter,
    adapted: "AdaptedVectors | None" = None,
) -> tuple[str, torch.Tensor | None]:
    """The strategy for this user and the vector to score with (None for `popular`).

    `adapted`, when given, remembers adapted vectors, so a user asking again with the same
    events is not adapted again."""
    user_row = snapshot.user_rows.get(user_id, -1)
    item_rows = snapshot.item_rows
    known_events = [event for event in recent if event.item_id in item_rows]

    if user_row >= 0 and snapshot.user_counts[user_row] >= cold_start_max_events:
        newer = [item_rows[e.item_id] for e in known_events if e.ts_s >= newer_than_ts]
        if not newer:
            return PERSONALIZED, snapshot.model.user_matrix[user_row]
        return PERSONALIZED, _adapt(snapshot, adapt, newer, user_row, adapted)

    if known_events:
        rows = [item_rows[event.item_id] for event in known_events]
        return COLD_START, _adapt(snapshot, adapt, rows, user_row, adapted)
    if user_row >= 0:
        return COLD_START, snapshot.model.user_matrix[user_row]
    return POPULAR, None


def _adapt(
    snapshot: Snapshot,
    adapt: Adapter,
    rows: list[int],
    base_row: int,
    adapted: "AdaptedVectors | None",
) -> torch.Tensor:
    if adapted is None:
        return adapt_one(snapshot, adapt, rows, base_row)
    return adapted.get(snapshot, adapt, rows, base_row)


class AdaptedVectors:
    """The newest adapted user vectors of one snapshot, least recently used dropped first.

    The key is the user's base row and the item rows adapted from, so a new event (or a new
    snapshot) always means a new adaptation; a repeated request costs one dictionary lookup.
    """

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._snapshot: Snapshot | None = None
        self._vectors: OrderedDict[tuple[int, tuple[int, ...]], torch.Tensor] = OrderedDict()

    def get(
        self, snapshot: Snapshot, adapt: Adapter, rows: list[int], base_row: int
    ) -> torch.Tensor:
        if snapshot is not self._snapshot:
            self._snapshot, self._vectors = snapshot, OrderedDict()
        key = (base_row, tuple(rows))
        vector = self._vectors.get(key)
        if vector is not None:
            self._vectors.move_to_end(key)
            return vector

        vector = adapt_one(snapshot, adapt, rows, base_row)
        self._vectors[key] = vector
        if len(self._vectors) > self.max_entries:
            self._vectors.popitem(last=False)
        return vector


def adapt_one(snapshot: Snapshot, adapt: Adapter, rows: list[int], base_row: int) -> torch.Tensor:
    """One user's adapted vector [D] from the item rows of their events (newest first)."""
    device = snapshot.device
    item_rows = torch.tensor([rows], dtype=torch.long, device=device)  # [1, K]
    mask = torch.ones_like(item_rows, dtype=torch.bool)  # [1, K]
    base_rows = torch.tensor([base_row], dtype=torch.long, device=device)  # [1]
    return adapt(snapshot.model, item_rows, mask, base_rows)[0]


# ranking


def top_k(
    scores: torch.Tensor, k: int, masked_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best unmasked scores and their positions; `scores` is overwritten at the mask."""
    if masked_positions.numel():
        scores.index_fill_(0, masked_positions, float("-inf"))
    values, positions = torch.topk(scores, min(k, scores.numel()))
    keep = values > float("-inf")
    if not bool(keep.all()):
        values, positions = values[keep], positions[keep]
    return values, positions


def rank_for_vector(
    snapshot: Snapshot,
    user_vector: torch.Tensor,
    k: int,
    masked_rows: torch.Tensor,
    candidate_rows: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, item rows) of the k best items for a user vector; masked rows never appear."""
    if candidate_rows is None:
        return top_k(snapshot.score_all(user_vector), k, masked_rows)

    scores = snapshot.score_rows(user_vector, candidate_rows)
    masked_positions = torch.isin(candidate_rows, masked_rows).nonzero().view(-1)
    values, positions = top_k(scores, k, masked_positions)
    return values, candidate_rows[positions]


def rank_batch(
    snapshot: Snapshot, user_vectors: torch.Tensor, ks: list[int], masked_rows: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`rank_for_vector` over the whole catalogue for B users at once: one matrix product
    streams the item matrix once for all of them. user_vectors [B, D]."""
    scores = user_vectors @ snapshot.items_by_dim  # [B, n_items]
    for row, masked in enumerate(masked_rows):
        if masked.numel():
            scores[row].index_fill_(0, masked, float("-inf"))
    values, rows = torch.topk(scores, min(max(ks), snapshot.n_items), dim=1)  # [B, k_max]

    ranked = []
    for row, k in enumerate(ks):
        user_values, user_rows = values[row, :k], rows[row, :k]
        keep = user_values > float("-inf")
        ranked.append((user_values[keep], user_rows[keep]))
    return ranked


@dataclass(frozen=True, eq=False)
class _Scoring:
    snapshot: Snapshot
    user_vector: torch.Tensor
    k: int
    masked_rows: torch.Tensor
    done: "asyncio.Future[tuple[torch.Tensor, torch.Tensor]]"


class ScoringBatcher:
    """Scores together the requests that reach scoring in the same turn of the event loop.

    Under concurrent load several requests are ready at once; one [B, D] x [D, n] product costs
    little more than one matvec, because streaming the item matrix dominates. A lone request
    waits one loop turn (microseconds) and is scored alone.
    """

    def __init__(self, max_batch: int = 32) -> None:
        self.max_batch = max_batch
        self._pending: list[_Scoring] = []
        self.batches = 0
        self.scored = 0

    async def rank(
        self, snapshot: Snapshot, user_vector: torch.Tensor, k: int, masked_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[torch.Tensor, torch.Tensor]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(_Scoring(snapshot, user_vector, k, masked_rows, done))
        return await done

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        by_snapshot: dict[int, list[_Scoring]] = {}
        for scoring in pending:  # a swap may land between two requests of one turn
            by_snapshot.setdefault(id(scoring.snapshot), []).append(scoring)
        for group in by_snapshot.values():
            for start in range(0, len(group), self.max_batch):
                self._score(group[start : start + self.max_batch])

    def _score(self, batch: list[_Scoring]) -> None:
        try:
            ranked = rank_batch(
                batch[0].snapshot,
                torch.stack([scoring.user_vector for scoring in batch]),
                [scoring.k for scoring in batch],
                [scoring.masked_rows for scoring in batch],
            )
        except Exception as exc:
            for scoring in batch:
                if not scoring.done.done():
                    scoring.done.set_exception(exc)
            return

        self.batches += 1
        self.scored += len(batch)
        for scoring, result in zip(batch, ranked, strict=True):
            if not scoring.done.done():  # the request may have been cancelled meanwhile
                scoring.done.set_result(result)


def rank_popular(
    snapshot: Snapshot, k: int, masked_rows: torch.Tensor, candidate_rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, item rows) of the k most popular unmasked items, from the precomputed order."""
    prefix = snapshot.popular_rows
    exhaustive = prefix.numel() == snapshot.n_items
    if candidate_rows is not None:
        prefix = prefix[torch.isin(prefix, candidate_rows)]
    if masked_rows.numel():
        prefix = prefix[~torch.isin(prefix, masked_rows)]
    if prefix.numel() >= k or exhaustive:
        rows = prefix[:k]
        return snapshot.model.popularity[rows], rows

    # the precomputed prefix ran out under the filters: rank the whole catalogue
    popularity = snapshot.model.popularity
    if candidate_rows is None:
        return top_k(popularity.clone(), k, masked_rows)
    masked_positions = torch.isin(candidate_rows, masked_rows).nonzero().view(-1)
    values, positions = top_k(popularity[candidate_rows], k, masked_positions)
    return values, candidate_rows[positions]


def similar_items(
    snapshot: Snapshot, item_row: int, k: int, masked_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, item rows) of the k items nearest to one item on the embedding columns."""
    embeddings = snapshot.items_by_dim[: snapshot.model.embedding_dim]  # [E, n_items]
    query = embeddings[:, item_row]  # [E]
    cosine = (query @ embeddings) / (snapshot.embedding_norms * snapshot.embedding_norms[item_row])
    self_row = torch.tensor([item_row], dtype=torch.long, device=snapshot.device)
    return top_k(cosine, k, torch.cat([masked_rows, self_row]))


def rank_popular_list(
    popular: list[tuple[str, float]],
    k: int,
    excluded: set[str],
    hidden: frozenset[str],
    category: frozenset[str] | None,
) -> tuple[list[str], list[float]]:
    """The k best of a popularity list (most popular first), before any model exists."""
    item_ids: list[str] = []
    scores: list[float] = []
    for item_id, score in popular:
        if item_id in excluded or item_id in hidden:
            continue
        if category is not None and item_id not in category:
            continue
        item_ids.append(item_id)
        scores.append(score)
        if len(item_ids) == k:
            break
    return item_ids, scores


# popularity before any model version exists


class RecentPopularity:
    """Counts of items over the newest events of the newest slot buffers, cached for a while.

    Up to `recent_events` stream entries are read, newest slot first. The cache is refreshed
    in the background once stale, so only the very first caller waits for it.
    """

    def __init__(self, recent_events: int, cache_s: float, max_slots: int = 8) -> None:
        self.recent_events = recent_events
        self.cache_s = cache_s
        self.max_slots = max_slots
        self._popular: list[tuple[str, float]] | None = None
        self._computed_at = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def get(self, client: aioredis.Redis, keys: RedisKeys) -> list[tuple[str, float]]:
        refresh = self._refresh
        stale = time.monotonic() - self._computed_at >= self.cache_s
        if stale and (refresh is None or refresh.done()):
            refresh = self._refresh = asyncio.create_task(self._recompute(client, keys))
            refresh.add_done_callback(_log_failed_refresh)
        if self._popular is None and refresh is not None:
            await asyncio.shield(refresh)
        return self._popular or []

    async def _recompute(self, client: aioredis.Redis, keys: RedisKeys) -> None:
        counts = await count_recent_items(client, keys, self.recent_events, self.max_slots)
        self._popular = [(item_id, float(n)) for item_id, n in counts.most_common()]
        self._computed_at = time.monotonic()


def _log_failed_refresh(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("recent popularity not refreshed: %r", task.exception())


async def count_recent_items(
    client: aioredis.Redis, keys: RedisKeys, recent_events: int, max_slots: int
) -> Counter[str]:
    counts: Counter[str] = Counter()
    remaining = recent_events
    for slot_id in await client.zrevrange(keys.slots_index, 0, max_slots - 1):
        reply = await client.xrevrange(keys.slot_stream(int(str(slot_id))), count=remaining)
        entries: list[Any] = list(reply or [])
        counts.update(str(fields["item_id"]) for _, fields in entries if "item_id" in fields)
        remaining -= len(entries)
        if remaining <= 0:
            break
    return counts


# the request


class Recommender:
    """Answers recommendation requests; holds the in-process caches, not the snapshot."""

    def __init__(
        self,
        keys: RedisKeys,
        adapt: Adapter,
        *,
        slot_seconds: int,
        cold_start_max_events: int,
        popularity: RecentPopularity,
    ) -> None:
        self.keys = keys
        self.adapt = adapt
        self.slot_seconds = slot_seconds
        self.cold_start_max_events = cold_start_max_events
        self.popularity = popularity
        self.filters = ItemFilters()
        self.batcher = ScoringBatcher()
        self.adapted = AdaptedVectors()

    async def recommend(
        self, client: aioredis.Redis, snapshot: Snapshot | None, query: RecommendQuery
    ) -> Recommendation:
        state = await read_user_state(
            client, self.keys, query.user_id, with_seen=query.exclude_seen
        )
        hidden = await self.filters.hidden_ids(client, self.keys, state.items_version)
        category = None
        if query.category is not None:
            category = await self.filters.category_ids(
                client, self.keys, state.items_version, query.category
            )
        excluded = state.seen.union(query.exclude)

        if snapshot is None:
            popular = await self.popularity.get(client, self.keys)
            item_ids, scores = rank_popular_list(popular, query.k, excluded, hidden, category)
            return _answer(query, item_ids, scores, None, POPULAR)
        return await self._rank(snapshot, query, state, excluded, hidden, category)

    async def _rank(
        self,
        snapshot: Snapshot,
        query: RecommendQuery,
        state: UserState,
        excluded: set[str],
        hidden: frozenset[str],
        category: frozenset[str] | None,
    ) -> Recommendation:
        strategy, user_vector = choose_user_vector(
            snapshot,
            query.user_id,
            state.recent,
            newer_than_ts=float((snapshot.trained_through_slot + 1) * self.slot_seconds),
            cold_start_max_events=self.cold_start_max_events,
            adapt=self.adapt,
            adapted=self.adapted,
        )
        masked_rows = torch.cat(
            [self.filters.rows(snapshot, "hidden", hidden), rows_of(snapshot, excluded)]
        )
        candidate_rows = None
        if category is not None:
            candidate_rows = self.filters.rows(snapshot, f"category:{query.category}", category)

        if user_vector is None:
            values, rows = rank_popular(snapshot, query.k, masked_rows, candidate_rows)
        elif candidate_rows is None:
            values, rows = await self.batcher.rank(snapshot, user_vector, query.k, masked_rows)
        else:
            values, rows = rank_for_vector(
                snapshot, user_vector, query.k, masked_rows, candidate_rows
            )
        item_ids = [snapshot.item_ids[row] for row in rows.tolist()]
        return _answer(query, item_ids, values.tolist(), snapshot.version, strategy)


def _answer(
    query: RecommendQuery,
    item_ids: list[str],
    scores: list[float],
    model_version: int | None,
    strategy: str,
) -> Recommendation:
    return Recommendation(
        user_id=query.user_id,
        item_ids=item_ids,
        scores=scores,
        model_version=model_version,
        strategy=strategy,
        recommendation_id=uuid.uuid4().hex,
    )
