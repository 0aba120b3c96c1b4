"""The recommender's scoring and the fit of a slot's rows under a softmax over the catalogue.

Score of item j for a user u: `u . v_j + b_j + o_j`, where `o_j` is a constant per-item offset
during a fit (the recency term `w . f_j` with the current weights, or 0). Up to
`full_softmax_items` items the softmax runs over the whole catalogue; beyond it, over the batch's
positives plus a fixed number of uniformly sampled negatives whose logits are corrected by
log((N - positives) / negatives), so a fit costs the same whatever the catalogue size.

Only the rows a slot touches are fitted: they are gathered into small leaf tensors, optimised,
and handed back; the rest of the catalogue is a constant.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 3
    batch_size: int = 512
    lr: float = 0.02
    l2: float = 1e-3  # pull toward the starting rows (a proximal term, per row)
    full_softmax_items: int = 2048
    negatives: int = 1024


@dataclass(frozen=True)
class Catalogue:
    """The item side held constant during a fit."""

    item_emb: torch.Tensor  # [N, d]
    item_bias: torch.Tensor  # [N]
    item_offset: torch.Tensor  # [N]
    dot_scale: float = 1.0  # score = dot_scale * u.v + bias_scale * b + offset, as served
    bias_scale: float = 1.0

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0])


@dataclass(frozen=True)
class Candidates:
    """The items a batch's softmax runs over."""

    rows: torch.Tensor | None  # [C] rows into the catalogue; None = every item
    correction: torch.Tensor | float  # [C] added to the logits (log of inverse inclusion)
    target: torch.Tensor  # [B] index of each event's positive among the candidates


def sample_candidates(
    positive_rows: torch.Tensor,  # [B] catalogue rows of the batch's positives
    n_items: int,
    full_softmax_items: int,
    negatives: int,
    generator: torch.Generator,
) -> Candidates:
    if n_items <= full_softmax_items:
        return Candidates(rows=None, correction=0.0, target=positive_rows)

    # the batch's positives are always in; uniform negatives stand for the rest of the catalogue
    unique_rows, target = torch.unique(positive_rows, return_inverse=True)
    sampled = torch.randint(n_items, (negatives,), generator=generator)
    sampled = sampled.to(positive_rows.device)
    sampled = sampled[~torch.isin(sampled, unique_rows)]
    n_rest = max(n_items - int(unique_rows.shape[0]), 1)
    weight = math.log(max(n_rest / negatives, 1e-6))
    correction = torch.cat(
        [
            torch.zeros(unique_rows.shape[0], device=positive_rows.device),
            torch.full((sampled.shape[0],), weight, device=positive_rows.device),
        ]
    )
    return Candidates(rows=torch.cat([unique_rows, sampled]), correction=correction, target=target)


def fit_rows(
    catalogue: Catalogue,
    user_start: torch.Tensor,  # [Tu, d] starting rows of the touched users
    item_rows: torch.Tensor,  # [Ti] catalogue rows of the touched items
    event_user: torch.Tensor,  # [E] index into user_start
    event_item: torch.Tensor,  # [E] index into item_rows
    config: FitConfig,
    generator: torch.Generator,
    epochs: int | None = None,
    item_start: tuple[torch.Tensor, torch.Tensor] | None = None,
    seen: "SeenCsr | None" = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the touched rows on the events; returns (users [Tu, d], items [Ti, d], bias [Ti]).

    The rows are pulled toward where they started, so a slot adjusts a model and does not
    replace it. `item_start` overrides the starting item rows (default: the catalogue's);
    `seen` (CSR over the touched users) lists items masked out of each user's softmax.
    """
    if item_start is None:
        item_start = (catalogue.item_emb[item_rows], catalogue.item_bias[item_rows])
    users = user_start.detach().clone().requires_grad_(True)
    items = item_start[0].detach().clone().requires_grad_(True)
    bias = item_start[1].detach().clone().requires_grad_(True)
    anchors = (users.detach().clone(), items.detach().clone())
    fused = users.device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam([users, items, bias], lr=config.lr, fused=fused)

    n_events = int(event_user.shape[0])
    for _ in range(config.epochs if epochs is None else epochs):
        order = torch.randperm(n_events, generator=generator).to(event_user.device)
        for start in range(0, n_events, config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = _batch_loss(
                catalogue, users, items, bias, item_rows, anchors,
                event_user[batch], event_item[batch], config, generator, seen,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return users.detach(), items.detach(), bias.detach()


def _batch_loss(
    catalogue: Catalogue,
    users: torch.Tensor,
    items: torch.Tensor,
    bias: torch.Tensor,
    item_rows: torch.Tensor,
    anchors: tuple[torch.Tensor, torch.Tensor],
    batch_user: torch.Tensor,  # [B]
    batch_item: torch.Tensor,  # [B]
    config: FitConfig,
    generator: torch.Generator,
    seen: "SeenCsr | None",
) -> torch.Tensor:
    user_vecs = users[batch_user]  # [B, d]
    touched_items = torch.unique(batch_item)

    # the softmax over the catalogue (or over positives + sampled negatives)
    if catalogue.n_items <= config.full_softmax_items:
        emb = catalogue.item_emb.index_copy(0, item_rows, items)  # [N, d]
        item_bias = catalogue.item_bias.index_copy(0, item_rows, bias)  # [N]
        logits = (
            catalogue.dot_scale * user_vecs @ emb.T
            + catalogue.bias_scale * item_bias
            + catalogue.item_offset
        )  # [B, N]
        target = item_rows[batch_item]
        candidate_rows = None
    else:
        candidates = sample_candidates(
            item_rows[batch_item], catalogue.n_items, config.full_softmax_items,
            config.negatives, generator,
        )  # fmt: skip
        assert candidates.rows is not None
        n_pos = int(touched_items.shape[0])
        # the same items in the order of their catalogue rows, as the candidates list them
        local_pos = touched_items[torch.argsort(item_rows[touched_items])]
        negatives = candidates.rows[n_pos:]
        emb = torch.cat([items[local_pos], catalogue.item_emb[negatives]])  # [C, d]
        item_bias = torch.cat([bias[local_pos], catalogue.item_bias[negatives]])  # [C]
        offset = catalogue.item_offset[candidates.rows]  # [C]
        logits = (
            catalogue.dot_scale * user_vecs @ emb.T
            + catalogue.bias_scale * item_bias
            + offset
            + candidates.correction
        )  # [B, C]
        target = candidates.target
        candidate_rows = candidates.rows

    # what the user touched before the slot is masked, as it is when serving
    if seen is not None:
        mask = seen_mask(seen, batch_user, item_rows[batch_item], candidate_rows, catalogue.n_items)
        logits = logits.masked_fill(mask, -math.inf)

    # softmax loss plus the pull of the batch's rows toward their starting point
    loss = F.cross_entropy(logits, target)
    pull_users = (user_vecs - anchors[0][batch_user]).pow(2).sum(1).mean()
    pull_items = (items[touched_items] - anchors[1][touched_items]).pow(2).sum(1).mean()
    return loss + config.l2 * (pull_users + pull_items)


def softmax_nll(
    user_vecs: torch.Tensor,  # [B, d]
    item_emb: torch.Tensor,  # [C, d]
    item_bias: torch.Tensor,  # [C]
    offset: torch.Tensor,  # [B, C] or [C]
    target: torch.Tensor,  # [B]
    correction: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood [B] of each event's item under the softmax over the candidates."""
    logits = user_vecs @ item_emb.T + item_bias + offset + correction
    return F.cross_entropy(logits, target, reduction="none")


@dataclass(frozen=True)
class SeenCsr:
    """Items to mask per user, as CSR over a small set of users (torch, on the model's device)."""

    indptr: torch.Tensor  # [T + 1]
    items: torch.Tensor  # [S] catalogue rows

    @classmethod
    def from_numpy(cls, indptr: "object", items: "object", device: torch.device) -> "SeenCsr":
        return cls(
            torch.as_tensor(indptr, dtype=torch.long, device=device),
            torch.as_tensor(items, dtype=torch.long, device=device),
        )


def seen_mask(
    seen: SeenCsr,
    event_users: torch.Tensor,  # [B] index into the CSR's users
    target_rows: torch.Tensor,  # [B] catalogue row of each event's positive (never masked)
    candidate_rows: torch.Tensor | None,  # [C] catalogue rows, None = the whole catalogue
    n_items: int,
) -> torch.Tensor:
    """[B, C] True where the candidate is an item the event's user touched before."""
    starts = seen.indptr[event_users]
    lengths = seen.indptr[event_users + 1] - starts  # [B]
    batch = event_users.shape[0]
    n_columns = n_items if candidate_rows is None else int(candidate_rows.shape[0])
    mask = torch.zeros(batch, n_columns, dtype=torch.bool, device=event_users.device)
    total = int(lengths.sum())
    if total == 0:
        return mask

    # every (event, seen item) pair, without a Python loop
    event_of_pair = torch.repeat_interleave(torch.arange(batch, device=mask.device), lengths)
    first_of_pair = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    offset = torch.arange(total, device=mask.device) - first_of_pair
    items = seen.items[starts[event_of_pair] + offset]

    if candidate_rows is None:
        columns, valid = items, items < n_items
    else:
        sorted_rows, order = torch.sort(candidate_rows)
        position = torch.searchsorted(sorted_rows, items).clamp(max=sorted_rows.shape[0] - 1)
        valid = sorted_rows[position] == items
        columns = order[position]
    mask[event_of_pair[valid], columns[valid]] = True

    # the event's own positive stays in, even when it is a repeat
    if candidate_rows is None:
        target_columns = target_rows
    else:
        sorted_rows, order = torch.sort(candidate_rows)
        target_columns = order[
            torch.searchsorted(sorted_rows, target_rows).clamp(max=n_columns - 1)
        ]
    mask[torch.arange(batch, device=mask.device), target_columns] = False
    return mask
