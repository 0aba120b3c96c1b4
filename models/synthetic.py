"""Small synthetic streams and models with a planted temporal drift, for tests and benchmarks.

The stream imitates what makes next-slot prediction hard on real logs: items are released over
time and are hottest right after release, users have a stable taste, and a large share of each
slot's users were never seen before.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.batch import SlotBatch
from models.serving import ServingModel

if TYPE_CHECKING:
    from models.meta import LearnerConfig, LearnerState


@dataclass(frozen=True)
class StreamSpec:
    n_slots: int = 8
    n_items: int = 300
    taste_dim: int = 8
    users_per_slot: int = 120
    new_user_share: float = 0.45
    events_per_user: float = 8.0
    release_decay_slots: float = 1.5  # how fast an item cools after its release
    hotness: float = 3.0  # log-boost of a just-released item
    taste_scale: float = 1.5
    slot_seconds: int = 7 * 24 * 3600
    start_ts_s: float = 1_000_000_000.0
    seed: int = 0


def drifting_stream(spec: StreamSpec) -> list[SlotBatch]:
    """`spec.n_slots` slots of events; item `i{n}` and user `u{n}` ids are strings."""
    rng = np.random.default_rng(spec.seed)
    item_taste = rng.normal(size=(spec.n_items, spec.taste_dim)) / np.sqrt(spec.taste_dim)
    # a quarter of the items exist from the start, the rest are released slot by slot
    release_slot = np.where(
        rng.random(spec.n_items) < 0.25, 0, rng.integers(0, spec.n_slots, spec.n_items)
    )
    users_taste: list[np.ndarray] = []
    seen: list[set[int]] = []

    slots = []
    for slot in range(spec.n_slots):
        active = _active_users(rng, spec, users_taste, seen)
        age = slot - release_slot
        boost = np.where(
            age >= 0, spec.hotness * np.exp(-np.maximum(age, 0) / spec.release_decay_slots), -np.inf
        )
        slots.append(_slot_events(rng, spec, slot, active, users_taste, seen, item_taste, boost))
    return slots


def _active_users(
    rng: np.random.Generator, spec: StreamSpec, users_taste: list[np.ndarray], seen: list[set[int]]
) -> list[int]:
    n_new = round(spec.users_per_slot * spec.new_user_share) if users_taste else 0
    n_new = spec.users_per_slot if not users_taste else n_new
    n_returning = min(spec.users_per_slot - n_new, len(users_taste))
    returning = rng.choice(len(users_taste), size=n_returning, replace=False).tolist()
    fresh = list(range(len(users_taste), len(users_taste) + n_new))
    for _ in fresh:
        users_taste.append(rng.normal(size=spec.taste_dim) * spec.taste_scale)
        seen.append(set())
    return returning + fresh


def _slot_events(
    rng: np.random.Generator,
    spec: StreamSpec,
    slot: int,
    active: list[int],
    users_taste: list[np.ndarray],
    seen: list[set[int]],
    item_taste: np.ndarray,
    boost: np.ndarray,
) -> SlotBatch:
    user_ids, item_ids, ts_s = [], [], []
    slot_start_s = spec.start_ts_s + slot * spec.slot_seconds
    for user in active:
        logits = item_taste @ users_taste[user] + boost
        logits[list(seen[user])] = -np.inf
        n_open = int(np.isfinite(logits).sum())
        n_events = min(1 + rng.poisson(spec.events_per_user - 1), n_open)
        if n_events == 0:
            continue

        # sample without replacement in proportion to exp(logits) (Gumbel top-k)
        noisy = logits + rng.gumbel(size=logits.shape)
        chosen = np.argsort(-noisy)[:n_events]
        first_s = slot_start_s + rng.random() * spec.slot_seconds * 0.9
        for offset, item in enumerate(chosen):
            seen[user].add(int(item))
            user_ids.append(f"u{user}")
            item_ids.append(f"i{item}")
            ts_s.append(min(first_s + 60.0 * offset, slot_start_s + spec.slot_seconds - 1))
    order = np.argsort(np.asarray(ts_s), kind="stable")
    return SlotBatch(
        user_ids=[user_ids[i] for i in order],
        item_ids=[item_ids[i] for i in order],
        ts_s=np.asarray(ts_s, dtype=np.float64)[order],
        values=np.ones(len(order), dtype=np.float32),
        slot_id=int(slot_start_s // spec.slot_seconds),
    )


def toy_serving_model(
    n_users: int = 50, n_items: int = 200, embedding_dim: int = 16, seed: int = 0
) -> ServingModel:
    """A random model with the column layout the learner publishes:
    item_matrix = [embedding | bias | recency features], user rows = [embedding | 1 | weights]."""
    gen = torch.Generator().manual_seed(seed)
    n_recency = 3
    item_emb = torch.randn(n_items, embedding_dim, generator=gen) / embedding_dim**0.5
    bias = torch.randn(n_items, 1, generator=gen) * 0.1
    recency = torch.log1p(torch.rand(n_items, n_recency, generator=gen) * 20)
    weights = torch.full((n_recency,), 1.0 / n_recency)

    user_emb = torch.randn(n_users, embedding_dim, generator=gen) / embedding_dim**0.5
    ones = torch.ones(n_users, 1)
    user_matrix = torch.cat([user_emb, ones, weights.expand(n_users, -1)], dim=1)
    item_matrix = torch.cat([item_emb, bias, recency], dim=1)
    user_init = torch.cat([torch.zeros(embedding_dim), torch.ones(1), weights])
    step_size = torch.cat([torch.full((embedding_dim,), 0.5), torch.zeros(1 + n_recency)])
    return ServingModel(
        item_ids=[f"i{n}" for n in range(n_items)],
        user_ids=[f"u{n}" for n in range(n_users)],
        item_matrix=item_matrix,
        user_matrix=user_matrix,
        user_counts=torch.full((n_users,), 20.0),
        popularity=item_matrix @ user_init,
        embedding_dim=embedding_dim,
        adapt_params={
            "user_init": user_init,
            "step_size": step_size,
            "adapt_steps": torch.tensor(3.0),
            "warm_prior_events": torch.tensor(10.0),
        },
        meta={"source": "toy"},
    )


def zipf_slot(
    n_events: int,
    user_ids: list[str],
    n_items: int,
    new_user_share: float,
    slot_start_s: float,
    slot_seconds: float,
    seed: int,
    new_item_share: float = 0.01,
) -> SlotBatch:
    """A slot of `n_events` with Zipf item popularity over `n_items` ids `i{n}` (plus a few new
    items), users drawn from `user_ids` and a share of new users `n{seed}_{k}`."""
    rng = np.random.default_rng(seed)
    n_known = max(int(len(user_ids) * 0.2), 1)
    n_new = max(int(n_known * new_user_share / max(1.0 - new_user_share, 1e-6)), 1)
    pool = list(rng.choice(user_ids, size=n_known, replace=False)) if user_ids else []
    pool += [f"n{seed}_{k}" for k in range(n_new)]

    ranks = np.arange(1, n_items + 1)
    probs = 1.0 / ranks
    items = rng.choice(n_items, size=n_events, p=probs / probs.sum())
    fresh = rng.random(n_events) < new_item_share
    item_ids = [
        f"x{seed}_{item % 50}" if is_fresh else f"i{item}"
        for item, is_fresh in zip(items.tolist(), fresh.tolist(), strict=True)
    ]
    ts_s = np.sort(slot_start_s + rng.random(n_events) * slot_seconds)
    return SlotBatch(
        user_ids=[pool[k] for k in rng.integers(0, len(pool), n_events).tolist()],
        item_ids=item_ids,
        ts_s=ts_s,
        values=np.ones(n_events, dtype=np.float32),
    )


def seeded_state(
    config: "LearnerConfig", n_users: int, n_items: int, device: str = "cpu", seed: int = 0
) -> "LearnerState":
    """A learner state that already knows `n_users` users and `n_items` items, with random rows,
    recency counts, seen lists and a full replay reservoir; for benchmarks at a catalogue size
    no quick replay reaches."""
    from models.meta import LearnerState

    gen = torch.Generator().manual_seed(seed)
    d = config.embedding_dim
    state = LearnerState.empty(config, device)
    state.users.extend([f"u{n}" for n in range(n_users)])
    state.items.extend([f"i{n}" for n in range(n_items)])
    state.user_emb.append(torch.randn(n_users, d, generator=gen) * 0.3)
    state.user_counts.append(torch.full((n_users,), 10.0))
    state.item_emb.append(torch.randn(n_items, d, generator=gen) * 0.3)
    state.item_bias.append(torch.randn(n_items, generator=gen) * 0.1)
    state.recency.grow(n_items)
    state.seen.grow(n_users)

    # a history of Zipf-popular events for the counts, the seen lists and the reservoir
    n_history = max(4 * n_users, 10_000)
    ranks = torch.arange(1, n_items + 1, dtype=torch.float64)
    items = torch.multinomial(1.0 / ranks, n_history, replacement=True, generator=gen)
    users = torch.randint(n_users, (n_history,), generator=gen)
    ts_s = torch.sort(torch.rand(n_history, generator=gen, dtype=torch.float64) * 1e5)[0]
    state.recency.advance(items.to(device), ts_s.to(device))
    state.seen.extend(users.numpy(), items.numpy())
    state.reservoir.offer(users.to(device), items.to(device), gen)
    state.slots_seen = 1
    return state
