"""Fast adaptation of user vectors (`adapt_users`) over a published model."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.coldstart import adapt_users, local_update
from models.errors import IncompatibleState, UnknownIds
from models.synthetic import toy_serving_model

MODEL = toy_serving_model(n_users=30, n_items=120, embedding_dim=16, seed=4)


def _events(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows) or 1
    item_rows = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        item_rows[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return item_rows, mask


def _support_loss(vectors: torch.Tensor, rows: list[int]) -> float:
    log_probs = F.log_softmax(vectors @ MODEL.item_matrix.T, dim=-1)
    return float(-log_probs[..., rows].mean())


def test_without_events_a_user_keeps_its_starting_point() -> None:
    item_rows, mask = _events([[], []])
    vectors = adapt_users(MODEL, item_rows, mask, torch.tensor([-1, 7]))
    torch.testing.assert_close(vectors[0], MODEL.adapt_params["user_init"])
    torch.testing.assert_close(vectors[1], MODEL.user_matrix[7])
    # an unknown user with no events is ranked by the model's popularity
    torch.testing.assert_close(MODEL.item_matrix @ vectors[0], MODEL.popularity)


def test_a_new_user_moves_toward_its_events() -> None:
    support = [3, 17, 42]
    item_rows, mask = _events([support])
    adapted = adapt_users(MODEL, item_rows, mask, torch.tensor([-1]))[0]
    start = MODEL.adapt_params["user_init"]
    assert _support_loss(adapted, support) < _support_loss(start, support)
    # only the taste part moves: the bias and recency columns have zero step size
    d = MODEL.embedding_dim
    torch.testing.assert_close(adapted[d:], start[d:])


def test_warm_users_move_less_the_more_they_were_trained_on() -> None:
    counts = MODEL.user_counts.clone()
    counts[5], counts[6] = 1.0, 500.0
    model = replace(MODEL, user_counts=counts)
    model.user_matrix[6] = model.user_matrix[5]
    item_rows, mask = _events([[8, 9, 10], [8, 9, 10]])
    vectors = adapt_users(model, item_rows, mask, torch.tensor([5, 6]))
    light = (vectors[0] - model.user_matrix[5]).norm()
    heavy = (vectors[1] - model.user_matrix[6]).norm()
    assert heavy < 0.1 * light


def test_the_batch_is_the_same_as_one_user_at_a_time() -> None:
    rows = [[1, 2, 3, 4], [], [50], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    base = torch.tensor([-1, 3, -1, 12])
    item_rows, mask = _events(rows)
    together = adapt_users(MODEL, item_rows, mask, base)
    for i, r in enumerate(rows):
        alone = adapt_users(MODEL, *_events([r]), base[i : i + 1])
        torch.testing.assert_close(together[i], alone[0])


def test_local_update_is_differentiable_in_its_meta_parameters() -> None:
    start = MODEL.adapt_params["user_init"].clone().requires_grad_(True)
    step = MODEL.adapt_params["step_size"].clone().requires_grad_(True)
    item_rows, mask = _events([[3, 4, 5]])
    adapted = local_update(MODEL.item_matrix, start.unsqueeze(0), item_rows, mask, step, 3)
    loss = -F.log_softmax(adapted @ MODEL.item_matrix.T, dim=-1)[0, 6]
    loss.backward()
    assert start.grad is not None and step.grad is not None
    assert float(step.grad[: MODEL.embedding_dim].abs().sum()) > 0


def test_bad_rows_raise_named_errors() -> None:
    item_rows, mask = _events([[1, 2]])
    with pytest.raises(UnknownIds) as error:
        adapt_users(MODEL, torch.tensor([[1, 500]]), mask, torch.tensor([-1]))
    assert error.value.field == "item_rows"
    with pytest.raises(UnknownIds):
        adapt_users(MODEL, item_rows, mask, torch.tensor([99]))
    with pytest.raises(UnknownIds):
        adapt_users(MODEL, item_rows, mask, torch.tensor([-1, -1]))
    # padding outside the mask may hold anything
    padded = torch.tensor([[1, 999]])
    adapt_users(MODEL, padded, torch.tensor([[True, False]]), torch.tensor([-1]))
    with pytest.raises(IncompatibleState):
        adapt_users(replace(MODEL, adapt_params={}), item_rows, mask, torch.tensor([-1]))
