"""The immutable snapshot an API process serves from, built from one published `ServingModel`.

A snapshot is built and warmed off the request path and never changed afterwards; the serving
manager swaps in a new one with a single reference assignment, so a request that started on the
old snapshot finishes on it.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.serving import ServingModel

# adapt_users(model, item_rows [B, K], mask [B, K], base_rows [B]) -> user vectors [B, D]
Adapter = Callable[[ServingModel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# how many of the most popular items are kept in order for the `popular` strategy's fast path
POPULAR_PREFIX = 2_048


@dataclass(frozen=True, eq=False)
class Snapshot:
    version: int
    trained_through_slot: int
    # tensors on `device`; model.item_matrix is a transposed view of items_by_dim
    model: ServingModel
    items_by_dim: torch.Tensor  # [D, n_items] contiguous: the layout a matvec streams fastest
    item_ids: list[str]
    item_rows: dict[str, int]
    user_rows: dict[str, int]
    user_counts: list[int]
    popular_rows: torch.Tensor  # [n_prefix] item rows, most popular first
    embedding_norms: torch.Tensor  # [n_items] norms of the embedding columns, for cosine
    device: torch.device
    load_ms: float

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def score_all(self, user_vector: torch.Tensor) -> torch.Tensor:
        """Scores of every item for one user vector [D] -> [n_items]."""
        return user_vector @ self.items_by_dim

    def score_rows(self, user_vector: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Scores of the given item rows only -> [len(rows)]."""
        if rows.numel() * 4 >= self.n_items:
            return self.score_all(user_vector).index_select(0, rows)
        return user_vector @ self.items_by_dim.index_select(1, rows)


def build_snapshot(
    model: ServingModel,
    *,
    version: int,
    trained_through_slot: int,
    device: str | torch.device = "cpu",
) -> Snapshot:
    """Move the model's tensors to `device`, lay out the item matrix for scoring, index the ids."""
    started = time.perf_counter()
    device = torch.device(device)
    items_by_dim = model.item_matrix.detach().to(device, torch.float32).t().contiguous()
    on_device = replace(
        model,
        item_matrix=items_by_dim.t(),
        user_matrix=model.user_matrix.detach().to(device, torch.float32),
        user_counts=model.user_counts.detach().to(device),
        popularity=model.popularity.detach().to(device, torch.float32),
        adapt_params={name: t.detach().to(device) for name, t in model.adapt_params.items()},
    )
    _check_shapes(on_device)

    n_prefix = min(POPULAR_PREFIX, len(model.item_ids))
    popular_rows = torch.topk(on_device.popularity, n_prefix).indices
    embedding_norms = items_by_dim[: model.embedding_dim].norm(dim=0).clamp_min(1e-12)

    return Snapshot(
        version=version,
        trained_through_slot=trained_through_slot,
        model=on_device,
        items_by_dim=items_by_dim,
        item_ids=list(model.item_ids),
        item_rows={item_id: row for row, item_id in enumerate(model.item_ids)},
        user_rows={user_id: row for row, user_id in enumerate(model.user_ids)},
        user_counts=[int(count) for count in model.user_counts.tolist()],
        popular_rows=popular_rows,
        embedding_norms=embedding_norms,
        device=device,
        load_ms=(time.perf_counter() - started) * 1e3,
    )


def _check_shapes(model: ServingModel) -> None:
    n_items, n_users = len(model.item_ids), len(model.user_ids)
    if model.item_matrix.shape[0] != n_items or model.popularity.shape != (n_items,):
        raise ValueError(f"item tensors do not match the {n_items} item ids")
    if model.user_matrix.shape[0] != n_users or model.user_counts.shape != (n_users,):
        raise ValueError(f"user tensors do not match the {n_users} user ids")
    if n_users and model.user_matrix.shape[1] != model.item_matrix.shape[1]:
        raise ValueError("user and item matrices differ in width")
    if not 0 < model.embedding_dim <= model.item_matrix.shape[1]:
        raise ValueError(f"embedding_dim {model.embedding_dim} is outside the item matrix")


def load_snapshot(
    path: Path, *, version: int, trained_through_slot: int, device: str | torch.device = "cpu"
) -> Snapshot:
    """Read a published version's directory and build its snapshot (blocking: run in a thread)."""
    started = time.perf_counter()
    model = ServingModel.load(path, device="cpu")
    snapshot = build_snapshot(
        model, version=version, trained_through_slot=trained_through_slot, device=device
    )
    return replace(snapshot, load_ms=(time.perf_counter() - started) * 1e3)


def warm_snapshot(snapshot: Snapshot, adapt: Adapter) -> float:
    """Run one scoring and one adaptation so the first real request pays no first-call costs."""
    started = time.perf_counter()
    if snapshot.n_items == 0:
        return 0.0
    k = min(20, snapshot.n_items)
    user_vector = torch.zeros(snapshot.model.dim, device=snapshot.device)
    torch.topk(snapshot.score_all(user_vector), k)

    rows = snapshot.popular_rows[:1].view(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool, device=snapshot.device)
    base_rows = torch.full((1,), -1, dtype=torch.long, device=snapshot.device)
    adapted = adapt(snapshot.model, rows, mask, base_rows)
    torch.topk(snapshot.score_all(adapted[0]), k)
    return (time.perf_counter() - started) * 1e3
