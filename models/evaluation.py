"""Ranking metrics of the test-then-train protocol and the popularity yardsticks.

Every ranking runs over the items known before the slot being scored (the "universe"); the items
a user touched before the slot are masked; a target item no model could know (first seen in the
slot) still counts in the user's target set, so it costs every method alike.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Targets:
    """What the users active in a slot went on to touch, as universe columns."""

    users: list[str]
    columns: list[np.ndarray]  # per user: target items known before the slot
    sizes: np.ndarray  # per user: all target items, known or not
    seen: list[np.ndarray]  # per user: items touched before the slot (masked)


def rank_metrics(
    scores: torch.Tensor, targets: Targets, k: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k (hits / |targets|) and NDCG@k (ideal: min(|targets|, k) hits on top) per user."""
    scores = scores.clone().float()
    for row, seen in enumerate(targets.seen):
        if seen.size:
            scores[row, torch.from_numpy(seen)] = -math.inf
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices.cpu().numpy()  # [B, k]

    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall = np.zeros(len(targets.users))
    ndcg = np.zeros(len(targets.users))
    for row, (columns, size) in enumerate(zip(targets.columns, targets.sizes, strict=True)):
        hits = np.isin(top[row], columns)
        ideal = discounts[: min(int(size), k)].sum()
        recall[row] = hits.sum() / int(size)
        ndcg[row] = (discounts[: hits.shape[0]] * hits).sum() / ideal
    return recall, ndcg


def decayed_counts(
    slot_counts: list[np.ndarray], n_items: int, half_life_slots: float
) -> np.ndarray:
    """Popularity over past slots, each slot weighted 0.5 ** (age / half-life); inf = all time."""
    total = np.zeros(n_items)
    for age, counts in enumerate(reversed(slot_counts)):
        weight = 1.0 if math.isinf(half_life_slots) else 0.5 ** (age / half_life_slots)
        total[: counts.shape[0]] += weight * counts
    return total
