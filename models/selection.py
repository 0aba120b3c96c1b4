"""Which vector answers users with no events, chosen time-wise by a ranking metric.

The candidates are the learned new-user vector and each recency column of the item matrix alone
(a one-hot weight on it: that column's decayed count ranks exactly as the decayed popularity it
is a monotone transform of). Each slot, before it is learned, scores the candidates as they were
served on the users the slot brings in (first seen in it): NDCG@k and Recall@k of the items they
touch, among the items known before the slot. The scores are exponentially averaged over slots,
each slot weighted by its number of new users, and the best running candidate is served.
"""

import torch

TOP_K = 20


def empty_stats(n_candidates: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Decayed sums: `ndcg` and `recall` [C] weighted by new users, `users` [1] the weights."""
    zeros = torch.zeros(n_candidates, device=device)
    return {"ndcg": zeros.clone(), "recall": zeros.clone(), "users": torch.zeros(1, device=device)}


def slot_metrics(
    candidate_scores: torch.Tensor,  # [N, C] score of every known item under each candidate
    user_rows: torch.Tensor,  # [E] the new users' events
    item_rows: torch.Tensor,  # [E] their items (rows >= N: items not known before the slot)
    k: int = TOP_K,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean NDCG@k and Recall@k [C] over the users of the events, and their number."""
    n_items, n_candidates = candidate_scores.shape
    stride = max(n_items, int(item_rows.max()) + 1)
    pairs = torch.unique(user_rows * stride + item_rows)  # each (user, item) once
    items = pairs % stride
    users, user_index = torch.unique(pairs // stride, return_inverse=True)
    n_users, dtype = int(users.shape[0]), candidate_scores.dtype
    k = min(k, n_items)

    # where each (user, item) pair lands in each candidate's top k (unknown items never do)
    top = torch.topk(candidate_scores.T, k, dim=1).indices  # [C, k]
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=top.device, dtype=dtype))
    at = items[:, None, None] == top[None]  # [P, C, k]
    gain = (at.to(dtype) * discounts).sum(2)  # [P, C]
    hits = at.any(2).to(dtype)  # [P, C]

    # per user: hits over all the items touched, DCG over the ideal of min(size, k) hits
    sizes = torch.bincount(user_index, minlength=n_users).to(dtype)  # [U]
    ideal = torch.cumsum(discounts, 0)[sizes.clamp(max=k).long() - 1]  # [U]
    dcg = torch.zeros(n_users, n_candidates, dtype=dtype, device=top.device)
    found = torch.zeros_like(dcg)
    dcg.index_add_(0, user_index, gain)
    found.index_add_(0, user_index, hits)
    ndcg = (dcg / ideal[:, None]).mean(0)
    recall = (found / sizes[:, None]).mean(0)
    return ndcg, recall, n_users


def fold(
    stats: dict[str, torch.Tensor],
    ndcg: torch.Tensor,
    recall: torch.Tensor,
    n_users: int,
    decay: float,
) -> dict[str, torch.Tensor]:
    """The running sums after one more slot (older slots weigh `decay` times less)."""
    return {
        "ndcg": decay * stats["ndcg"] + n_users * ndcg,
        "recall": decay * stats["recall"] + n_users * recall,
        "users": decay * stats["users"] + n_users,
    }


def best_candidate(stats: dict[str, torch.Tensor]) -> int:
    """The candidate with the best running NDCG (the learned vector, 0, when nothing is known)."""
    if not stats or float(stats["users"].sum()) <= 0.0:
        return 0
    return int(torch.argmax(stats["ndcg"]))
