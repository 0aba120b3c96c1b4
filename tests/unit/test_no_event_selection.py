"""Users with no events: the running choice between the learned vector and the recency columns."""

from dataclasses import replace

import numpy as np
import torch

from models.coldstart import adapt_users
from models.evaluation import Targets, rank_metrics
from models.meta import LearnerConfig, LearnerState, TimewiseMetaLearner
from models.selection import best_candidate, empty_stats, fold, slot_metrics
from models.synthetic import StreamSpec, drifting_stream, toy_serving_model


def test_slot_metrics_agree_with_the_replay_metrics() -> None:
    generator = torch.Generator().manual_seed(0)
    n_items, k = 40, 5
    scores = torch.randn(n_items, 3, generator=generator)
    users = torch.randint(100, 108, (60,), generator=generator)
    items = torch.randint(0, 50, (60,), generator=generator)  # rows >= 40: unknown items

    ndcg, recall, n_users = slot_metrics(scores, users, items, k=k)

    names = sorted(set(users.tolist()))
    touched = [
        {i for u, i in zip(users.tolist(), items.tolist(), strict=True) if u == n} for n in names
    ]
    targets = Targets(
        users=[str(n) for n in names],
        columns=[np.array(sorted(i for i in t if i < n_items), dtype=np.int64) for t in touched],
        sizes=np.array([len(t) for t in touched]),
        seen=[np.zeros(0, dtype=np.int64) for _ in names],
    )
    assert n_users == len(names)
    for column in range(3):
        want_recall, want_ndcg = rank_metrics(scores[:, column].expand(len(names), -1), targets, k)
        assert abs(float(ndcg[column]) - want_ndcg.mean()) < 1e-5
        assert abs(float(recall[column]) - want_recall.mean()) < 1e-5


def test_the_running_best_weighs_slots_by_new_users_and_forgets() -> None:
    stats = empty_stats(3, "cpu")
    assert best_candidate(stats) == 0  # nothing measured yet: the learned vector
    stats = fold(stats, torch.tensor([0.1, 0.3, 0.2]), torch.zeros(3), 10, decay=0.5)
    assert best_candidate(stats) == 1
    # a later, larger slot outweighs the older one
    stats = fold(stats, torch.tensor([0.4, 0.1, 0.2]), torch.zeros(3), 20, decay=0.5)
    assert best_candidate(stats) == 0
    torch.testing.assert_close(stats["users"], torch.tensor([25.0]))


def test_only_users_without_events_or_rows_take_the_no_event_vector() -> None:
    model = toy_serving_model(n_items=30, n_users=4, embedding_dim=4)
    no_event = torch.zeros(model.dim)
    no_event[-1] = 1.0
    params = {**model.adapt_params, "no_event_init": no_event}
    chosen = replace(model, adapt_params=params)

    rows = torch.tensor([[3, 0], [0, 0], [0, 0]])
    mask = torch.tensor([[True, False], [False, False], [False, False]])
    base = torch.tensor([-1, -1, 2])
    got = adapt_users(chosen, rows, mask, base)
    want = adapt_users(model, rows, mask, base)

    torch.testing.assert_close(got[1], no_event)  # new, no events
    torch.testing.assert_close(got[0], want[0])  # new with an event: the usual local update
    torch.testing.assert_close(got[2], want[2])  # known: its own row


def test_the_learner_serves_the_measured_best_and_reports_it() -> None:
    spec = StreamSpec(n_slots=5, n_items=120, users_per_slot=60, events_per_user=5.0, seed=4)
    config = LearnerConfig(
        slot_seconds=spec.slot_seconds, embedding_dim=8, epochs=1, meta_steps=2, cold_users=16
    )
    learner, state = TimewiseMetaLearner(config), None
    reports = []
    for slot in drifting_stream(spec):
        state, report = learner.step(state, slot)
        reports.append(report)
    assert isinstance(state, LearnerState)
    assert all("no_event_ndcg_learned" in r.metrics for r in reports[1:])

    best = best_candidate(state.selection)
    assert int(torch.argmax(state.selection["ndcg"])) == best
    model = state.serving()
    assert model.meta["no_event_source"] in ("learned", *model.meta["recency_columns"])
    torch.testing.assert_close(
        model.popularity, model.item_matrix @ model.adapt_params["no_event_init"]
    )
