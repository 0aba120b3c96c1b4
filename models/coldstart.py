"""Fast adaptation of user vectors from a handful of events, on the request path.

A published `ServingModel` carries the meta-learned pieces in `adapt_params`:

- `user_init` [D]: where the local update of a user the model has never seen starts;
- `no_event_init` [D] (optional): the vector of a user the model has never seen and who has no
  events yet (its scores are `model.popularity`); `user_init` when absent;
- `step_size` [D]: per-dimension step sizes of the local update (Meta-SGD); zero on the columns
  that hold the item bias and the recency features, so only the taste part of a user moves;
- `support_scale` [D] (optional): before the steps, the start moves by this much of the mean of
  the user's item rows (a learned, per-dimension prototype step; zero outside the taste part);
- `adapt_steps` []: how many local steps to take;
- `warm_prior_events` []: a user the model already trained on `n` events moves by a fraction
  `prior / (prior + n)` of a new user's step, so long histories are not overwritten by a few clicks;
- `candidate_rows` [M] (optional): on a large catalogue the softmax of the local steps runs over
  these items (the most popular ones) plus the user's own, so its cost does not grow with it.

Each local step is one gradient step of the softmax loss of the user's events over the whole
catalogue, computed in closed form (no autograd), for every user of the batch at once.
"""

import torch

from models.errors import IncompatibleState, UnknownIds
from models.serving import ServingModel

ADAPT_KEYS = ("user_init", "step_size", "adapt_steps", "warm_prior_events")


def local_update(
    items: torch.Tensor,  # [N, D] item matrix
    start: torch.Tensor,  # [B, D] user vectors to start from
    item_rows: torch.Tensor,  # [B, K] rows of the support events
    mask: torch.Tensor,  # [B, K] True where the event is real
    step_size: torch.Tensor,  # [B, D] or [D] per-dimension step sizes
    adapt_steps: int,
    support_scale: torch.Tensor | float = 0.0,  # [B, D] or [D] share of the support mean
) -> torch.Tensor:
    """A step toward the mean of the user's item rows, then gradient steps of the mean softmax
    loss of the user's events; differentiable in `items`, `start`, `step_size` and
    `support_scale`, so the same code serves meta-training."""
    weights = mask.to(items.dtype)  # [B, K]
    n_events = weights.sum(1, keepdim=True)  # [B, 1]
    has_events = (n_events > 0).to(items.dtype)  # [B, 1]

    # the positive part of the gradient does not change between steps
    support = items[torch.where(mask, item_rows, 0)]  # [B, K, D]; padding may hold anything
    target = (support * weights.unsqueeze(-1)).sum(1) / n_events.clamp(min=1.0)  # [B, D]

    # d/dx of -mean_k log softmax(items @ x)[i_k] is E_p[item] - mean_k item_k
    user = start + has_events * support_scale * target
    for _ in range(adapt_steps):
        probs = torch.softmax(user @ items.T, dim=1)  # [B, N]
        grad = probs @ items - target  # [B, D]
        user = user - has_events * step_size * grad
    return user


def _check_inputs(
    model: ServingModel, item_rows: torch.Tensor, mask: torch.Tensor, base_rows: torch.Tensor
) -> None:
    missing = [key for key in ADAPT_KEYS if key not in model.adapt_params]
    if missing:
        raise IncompatibleState(f"the model has no adapt_params {missing}", field="adapt_params")
    if item_rows.dim() != 2 or mask.shape != item_rows.shape:
        raise UnknownIds(
            f"item_rows {tuple(item_rows.shape)} and mask {tuple(mask.shape)} must be [B, K]",
            field="item_rows",
        )
    if base_rows.dim() != 1 or base_rows.shape[0] != item_rows.shape[0]:
        raise UnknownIds(f"base_rows must be [B], got {tuple(base_rows.shape)}", "base_rows")

    n_items, n_users = model.item_matrix.shape[0], model.user_matrix.shape[0]
    real_rows = item_rows[mask]
    if real_rows.numel() and (int(real_rows.min()) < 0 or int(real_rows.max()) >= n_items):
        raise UnknownIds(f"item_rows outside [0, {n_items}) where mask is True", "item_rows")
    if base_rows.numel() and (int(base_rows.min()) < -1 or int(base_rows.max()) >= n_users):
        raise UnknownIds(f"base_rows outside [-1, {n_users})", field="base_rows")


@torch.no_grad()
def adapt_users(
    model: ServingModel,
    item_rows: torch.Tensor,  # [B, K] long, rows into model.item_ids
    mask: torch.Tensor,  # [B, K] bool, True = real event
    base_rows: torch.Tensor,  # [B] long, row in model.user_ids or -1
) -> torch.Tensor:
    """User vectors [B, D] to score with `model.item_matrix @ vector`.

    A user with no events keeps its starting point: its own row when the model knows it,
    `no_event_init` (else `user_init`) when it does not.
    """
    _check_inputs(model, item_rows, mask, base_rows)
    items = model.item_matrix
    device, dtype = items.device, items.dtype
    item_rows, mask, base_rows = item_rows.to(device), mask.to(device), base_rows.to(device)
    params = {key: value.to(device) for key, value in model.adapt_params.items()}

    # start from the user's own row when the model knows the user
    known = base_rows >= 0
    start = params["user_init"].to(dtype).expand(base_rows.shape[0], -1)
    counts = torch.zeros(base_rows.shape[0], dtype=dtype, device=device)
    if model.user_matrix.shape[0] > 0:
        safe_rows = base_rows.clamp(min=0)
        start = torch.where(known[:, None], model.user_matrix[safe_rows].to(dtype), start)
        counts = torch.where(known, model.user_counts[safe_rows].to(dtype), counts)
    if "no_event_init" in params:
        no_events = ~known & ~mask.any(1)
        no_event = params["no_event_init"].to(dtype).expand_as(start)
        start = torch.where(no_events[:, None], no_event, start)

    # warm users move less the more events they were trained on
    prior = params["warm_prior_events"].to(dtype)
    shrink = prior / (prior + counts)  # [B]; 1 for a new user
    step_size = params["step_size"].to(dtype)[None, :] * shrink[:, None]  # [B, D]
    support_scale = params.get("support_scale", torch.zeros_like(step_size[0]))
    support_scale = support_scale.to(dtype)[None, :] * shrink[:, None]  # [B, D]
    steps = int(params["adapt_steps"].item())

    # on a large catalogue: the popular candidates plus the users' own items
    candidates = params.get("candidate_rows")
    if candidates is not None and candidates.shape[0] < items.shape[0]:
        own = torch.where(mask, item_rows, 0)  # [B, K]
        pool = torch.cat([items[candidates.long()], items[own.reshape(-1)]])  # [M + B*K, D]
        local_rows = candidates.shape[0] + torch.arange(own.numel(), device=device)
        local_rows = local_rows.view_as(own)
        return local_update(pool, start, local_rows, mask, step_size, steps, support_scale)
    return local_update(items, start, item_rows, mask, step_size, steps, support_scale)
